// The tp × sp × dp grid of ranks: the one place that declares which world rank plays which part.
//
// Rank order (as Megatron-LM): tensor parallel innermost, then sequence parallel, then data
// parallel,
//
//     world rank = tp_rank + tp · (sp_rank + sp · dp_rank),
//
// so the ranks of a tp group are consecutive and sit on one node when a node holds a multiple of
// tp ranks (launch/ maps ranks to nodes in order): tp's all-reduces, the most frequent and largest
// exchanges of a step, stay on NVLink. An sp group is the ranks with the same (tp_rank, dp_rank),
// a dp group those with the same (tp_rank, sp_rank); every group is ordered by its coordinate.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"

namespace freqkv {

struct GridShape {
  int tp = 1, sp = 1, dp = 1;
  int64_t ranks() const { return int64_t{tp} * sp * dp; }
};

struct GridCoord {
  int tp = 0, sp = 0, dp = 0;
  bool operator==(const GridCoord& other) const {
    return tp == other.tp && sp == other.sp && dp == other.dp;
  }
};

enum class GridDim { kTp, kSp, kDp };

class ParallelGrid {
 public:
  // Collective over `world`: checks that every rank was given the same shape, validates it
  // against world's size (validate()), gathers the host names, and splits world into this rank's
  // tp, sp and dp groups; a dimension of size 1 is a LocalCommunicator with `local_copy` (nullptr:
  // memcpy, for host memory). Throws std::invalid_argument on every rank for a bad shape.
  ParallelGrid(std::unique_ptr<Communicator> world, GridShape shape,
               LocalCommunicator::CopyFn local_copy = nullptr);
  ParallelGrid(const ParallelGrid&) = delete;
  ParallelGrid& operator=(const ParallelGrid&) = delete;

  Communicator& world() const { return *world_; }
  Communicator& tp() const { return *tp_; }
  Communicator& sp() const { return *sp_; }
  Communicator& dp() const { return *dp_; }
  // The sp × dp ranks that hold the same tensor-parallel shard (Megatron's data-parallel group
  // "with context parallel"): every rank of it computed part of the same gradient, which is summed
  // over it in one reduction. Ordered by sp_rank + sp · dp_rank.
  Communicator& replicas() const { return *replicas_; }
  Communicator& group(GridDim dim) const;

  int world_rank() const { return world_->rank(); }
  int tp_rank() const { return coord_.tp; }
  int sp_rank() const { return coord_.sp; }
  int dp_rank() const { return coord_.dp; }
  const GridCoord& coord() const { return coord_; }
  const GridShape& shape() const { return shape_; }
  // Host name of every world rank, by world rank.
  const std::vector<std::string>& host_names() const { return host_names_; }

  // Start-up table (rank 0 prints it): the grid line, then one row per world rank with its host,
  // (tp, sp, dp) coordinates and the world ranks of its tp, sp and dp groups. Local: no
  // communication, any rank may call it.
  std::string table() const;

  // ---- the rank order, as pure functions of the shape ----
  static int world_rank_of(const GridShape& shape, const GridCoord& coord);
  static GridCoord coord_of(const GridShape& shape, int world_rank);
  // World ranks of the group along `dim` that holds `world_rank`, by rank in that group.
  static std::vector<int> group_ranks(const GridShape& shape, GridDim dim, int world_rank);
  // std::invalid_argument unless every dimension is >= 1 and tp·sp·dp == world_size:
  // "tp × sp × dp = 2 × 1 × 1 = 2 but 4 ranks were started: change parallel.tp/sp/dp or mpirun -np".
  static void validate(const GridShape& shape, int world_size);

 private:
  std::unique_ptr<Communicator> world_;
  GridShape shape_;
  GridCoord coord_;
  std::unique_ptr<Communicator> tp_, sp_, dp_, replicas_;
  std::vector<std::string> host_names_;
};

const char* grid_dim_name(GridDim dim);  // "tp", "sp", "dp"

// The grid of this process. MPI when an MpiSession is active and MPI_COMM_WORLD has more than one
// rank (world = a duplicate of MPI_COMM_WORLD); otherwise a one-rank grid of LocalCommunicators,
// so a single-rank run (with or without `mpirun -np 1`) makes no MPI calls and needs no MPI
// session. A process that an MPI launcher started while MPI is not active is a programming error
// (std::logic_error: create an MpiSession in main first), since each of its ranks would otherwise
// silently train alone. A shape whose product is not the world size is std::invalid_argument.
std::unique_ptr<ParallelGrid> make_grid(GridShape shape);

}  // namespace freqkv
