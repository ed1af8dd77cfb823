// ParallelGrid: the tp × sp × dp rank order, its groups, the start-up table (see parallel_grid.h).
#include "comm/parallel_grid.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <utility>

#include "comm/mpi_communicator.h"

namespace freqkv {

namespace {

// Host names travel as fixed-size records through the typed all_gather: 32 int64 words hold
// 255 bytes and the terminating zero (Linux limits host names to 64 bytes).
constexpr int kHostWords = 32;

std::string this_host_name() {
  char name[kHostWords * sizeof(int64_t)] = {};
  if (gethostname(name, sizeof name - 1) != 0) return "(unknown host)";
  name[sizeof name - 1] = '\0';
  return name;
}

std::string pad_right(const std::string& text, size_t width) {
  // Pads by characters of the (ASCII) cell text.
  return text + std::string(width > text.size() ? width - text.size() : 0, ' ');
}

std::string pad_left(const std::string& text, size_t width) {
  return std::string(width > text.size() ? width - text.size() : 0, ' ') + text;
}

int dim_size(const GridShape& shape, GridDim dim) {
  switch (dim) {
    case GridDim::kTp: return shape.tp;
    case GridDim::kSp: return shape.sp;
    case GridDim::kDp: return shape.dp;
  }
  throw std::invalid_argument("unknown GridDim value " + std::to_string(static_cast<int>(dim)));
}

}  // namespace

const char* grid_dim_name(GridDim dim) {
  switch (dim) {
    case GridDim::kTp: return "tp";
    case GridDim::kSp: return "sp";
    case GridDim::kDp: return "dp";
  }
  return "unknown GridDim";
}

// ---- the rank order ----------------------------------------------------------------------------

int ParallelGrid::world_rank_of(const GridShape& shape, const GridCoord& coord) {
  return coord.tp + shape.tp * (coord.sp + shape.sp * coord.dp);
}

GridCoord ParallelGrid::coord_of(const GridShape& shape, int world_rank) {
  GridCoord coord;
  coord.tp = world_rank % shape.tp;
  coord.sp = (world_rank / shape.tp) % shape.sp;
  coord.dp = world_rank / (shape.tp * shape.sp);
  return coord;
}

std::vector<int> ParallelGrid::group_ranks(const GridShape& shape, GridDim dim, int world_rank) {
  const GridCoord origin = coord_of(shape, world_rank);
  const int members = dim_size(shape, dim);
  std::vector<int> ranks;
  ranks.reserve(static_cast<size_t>(members));
  for (int i = 0; i < members; ++i) {
    GridCoord member = origin;
    (dim == GridDim::kTp ? member.tp : dim == GridDim::kSp ? member.sp : member.dp) = i;
    ranks.push_back(world_rank_of(shape, member));
  }
  return ranks;
}

void ParallelGrid::validate(const GridShape& shape, int world_size) {
  for (const GridDim dim : {GridDim::kTp, GridDim::kSp, GridDim::kDp}) {
    if (dim_size(shape, dim) < 1) {
      throw std::invalid_argument(std::string("parallel.") + grid_dim_name(dim) + " = " +
                                  std::to_string(dim_size(shape, dim)) +
                                  ": every grid dimension needs at least 1 rank");
    }
  }
  if (shape.ranks() != world_size) {
    throw std::invalid_argument(
        "tp × sp × dp = " + std::to_string(shape.tp) + " × " + std::to_string(shape.sp) + " × " +
        std::to_string(shape.dp) + " = " + std::to_string(shape.ranks()) + " but " +
        std::to_string(world_size) + (world_size == 1 ? " rank was" : " ranks were") +
        " started: change parallel.tp/sp/dp or mpirun -np");
  }
}

// ---- construction ------------------------------------------------------------------------------

ParallelGrid::ParallelGrid(std::unique_ptr<Communicator> world, GridShape shape,
                           LocalCommunicator::CopyFn local_copy)
    : world_(std::move(world)), shape_(shape) {
  if (!world_) throw std::invalid_argument("ParallelGrid: no world communicator given");
  // Ranks given different shapes would split differently and hang in MPI: compare first, so
  // every rank throws the same error.
  if (world_->size() > 1) {
    int32_t bounds[6] = {shape.tp, shape.sp, shape.dp, -shape.tp, -shape.sp, -shape.dp};
    world_->all_reduce_max(bounds, 6);
    if (bounds[0] != -bounds[3] || bounds[1] != -bounds[4] || bounds[2] != -bounds[5]) {
      throw std::invalid_argument(
          "ranks were given different grids: tp " + std::to_string(-bounds[3]) + ".." +
          std::to_string(bounds[0]) + ", sp " + std::to_string(-bounds[4]) + ".." +
          std::to_string(bounds[1]) + ", dp " + std::to_string(-bounds[5]) + ".." +
          std::to_string(bounds[2]) + " across ranks: every rank needs the same parallel.tp/sp/dp");
    }
  }
  validate(shape_, world_->size());
  coord_ = coord_of(shape_, world_->rank());

  int64_t own_name[kHostWords] = {};
  const std::string host = this_host_name();
  std::memcpy(own_name, host.data(), std::min(host.size(), sizeof own_name - 1));
  std::vector<int64_t> names(static_cast<size_t>(kHostWords) * world_->size());
  world_->all_gather(own_name, names.data(), kHostWords);
  for (int r = 0; r < world_->size(); ++r) {
    const char* record = reinterpret_cast<const char*>(names.data() + int64_t{r} * kHostWords);
    host_names_.emplace_back(record, strnlen(record, kHostWords * sizeof(int64_t)));
  }

  // Every rank runs the same splits in the same order (the shape is the same everywhere).
  const auto make_group = [&](GridDim dim, int color, int key) -> std::unique_ptr<Communicator> {
    std::unique_ptr<Communicator> group =
        dim_size(shape_, dim) > 1 ? world_->split(color, key, grid_dim_name(dim))
                                  : std::make_unique<LocalCommunicator>(local_copy);
    if (group->size() != dim_size(shape_, dim) || group->rank() != key) {
      throw std::logic_error(std::string("ParallelGrid: the ") + grid_dim_name(dim) +
                             " group of world rank " + std::to_string(world_->rank()) + " has " +
                             std::to_string(group->size()) + " ranks and this is rank " +
                             std::to_string(group->rank()) + ", expected " +
                             std::to_string(dim_size(shape_, dim)) + " and " +
                             std::to_string(key));
    }
    return group;
  };
  tp_ = make_group(GridDim::kTp, coord_.sp + shape_.sp * coord_.dp, coord_.tp);
  sp_ = make_group(GridDim::kSp, coord_.tp + shape_.tp * coord_.dp, coord_.sp);
  dp_ = make_group(GridDim::kDp, coord_.tp + shape_.tp * coord_.sp, coord_.dp);
  const int replica = coord_.sp + shape_.sp * coord_.dp, replicas = shape_.sp * shape_.dp;
  replicas_ = replicas > 1 ? world_->split(coord_.tp, replica, "sp×dp")
                           : std::make_unique<LocalCommunicator>(local_copy);
  if (replicas_->size() != replicas || replicas_->rank() != replica)
    throw std::logic_error("ParallelGrid: the sp×dp group of world rank " +
                           std::to_string(world_->rank()) + " has " +
                           std::to_string(replicas_->size()) + " ranks and this is rank " +
                           std::to_string(replicas_->rank()) + ", expected " +
                           std::to_string(replicas) + " and " + std::to_string(replica));
}

Communicator& ParallelGrid::group(GridDim dim) const {
  switch (dim) {
    case GridDim::kTp: return *tp_;
    case GridDim::kSp: return *sp_;
    case GridDim::kDp: return *dp_;
  }
  throw std::invalid_argument("unknown GridDim value " + std::to_string(static_cast<int>(dim)));
}

// ---- the start-up table ------------------------------------------------------------------------

std::string ParallelGrid::table() const {
  const int ranks = world_->size();
  std::string text = "grid: tp=" + std::to_string(shape_.tp) + " × sp=" +
                     std::to_string(shape_.sp) + " × dp=" + std::to_string(shape_.dp) + " = " +
                     std::to_string(ranks) + (ranks == 1 ? " rank" : " ranks") +
                     ", order: tp fastest\n";

  const std::vector<std::string> header = {"rank", "host", "tp", "sp", "dp",
                                           "tp group", "sp group", "dp group"};
  std::vector<std::vector<std::string>> rows;
  for (int r = 0; r < ranks; ++r) {
    const GridCoord c = coord_of(shape_, r);
    rows.push_back({std::to_string(r), host_names_[static_cast<size_t>(r)], std::to_string(c.tp),
                    std::to_string(c.sp), std::to_string(c.dp),
                    format_rank_list(group_ranks(shape_, GridDim::kTp, r)),
                    format_rank_list(group_ranks(shape_, GridDim::kSp, r)),
                    format_rank_list(group_ranks(shape_, GridDim::kDp, r))});
  }
  std::vector<size_t> width(header.size());
  for (size_t col = 0; col < header.size(); ++col) {
    width[col] = header[col].size();
    for (const auto& row : rows) width[col] = std::max(width[col], row[col].size());
  }
  // Numbers right-aligned (rank and coordinates), text left-aligned.
  const auto format_row = [&](const std::vector<std::string>& row) {
    std::string line;
    for (size_t col = 0; col < row.size(); ++col) {
      const bool numeric = col == 0 || (col >= 2 && col <= 4);
      std::string cell = numeric ? pad_left(row[col], width[col]) : pad_right(row[col], width[col]);
      line += (col ? "  " : "") + cell;
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    return line + "\n";
  };
  text += format_row(header);
  for (const auto& row : rows) text += format_row(row);
  return text;
}

// ---- the factory -------------------------------------------------------------------------------

std::unique_ptr<ParallelGrid> make_grid(GridShape shape) {
  if (MpiSession::active()) {
    if (MpiSession::world_size() > 1) {
      return std::make_unique<ParallelGrid>(std::make_unique<MpiCommunicator>(MPI_COMM_WORLD),
                                            shape);
    }
  } else if (MpiSession::started_by_launcher()) {
    throw std::logic_error(
        "make_grid: this process was started by an MPI launcher (mpirun/srun) but MPI is not "
        "initialised (or was already finalised): create an MpiSession at the start of main, "
        "before make_grid, so the ranks form one grid instead of each training alone");
  }
  return std::make_unique<ParallelGrid>(std::make_unique<LocalCommunicator>(), shape);
}

}  // namespace freqkv
