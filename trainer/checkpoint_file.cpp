// CheckpointWriter / CheckpointReader over the HDF5 C API. Every HDF5 identifier lives in an
// Hdf5Handle, and every failing HDF5 call becomes a std::runtime_error carrying the file, the
// tensor and HDF5's own explanation (its automatic error printing is switched off).
//
// The collective writer keeps its ranks in step with one rule: every public call is a sequence
// of local steps (validating arguments, building dataspaces and property lists), then one
// agreement (RankGroup::agreed_failure: an all-reduce of a failure flag and of a hash of the call),
// then the collective HDF5 step, then another agreement on its outcome. A rank never enters an
// HDF5 collective unless every rank is about to enter the same one, and an error found on any
// rank is raised on all of them. The serial writer runs the same code with a group of one rank,
// whose agreement is simply "throw this rank's failure".
#include "trainer/checkpoint_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <hdf5.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <exception>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <stdexcept>
#include <system_error>
#include <utility>

namespace freqkv {

namespace {

namespace fs = std::filesystem;

// Root attributes written by commit(); callers may not set them.
constexpr const char* kFormatKey = "format";
constexpr const char* kFormatVersionKey = "format_version";
constexpr const char* kCompleteKey = "complete";

// One HDF5 identifier, closed with its matching H5*close function when the handle goes away.
class Hdf5Handle {
 public:
  using Closer = herr_t (*)(hid_t);

  Hdf5Handle() = default;
  Hdf5Handle(hid_t id, Closer closer) : id_(id), closer_(closer) {}
  ~Hdf5Handle() { reset(); }
  Hdf5Handle(Hdf5Handle&& other) noexcept
      : id_(std::exchange(other.id_, H5I_INVALID_HID)), closer_(other.closer_) {}
  Hdf5Handle& operator=(Hdf5Handle&& other) noexcept {
    if (this != &other) {
      reset();
      id_ = std::exchange(other.id_, H5I_INVALID_HID);
      closer_ = other.closer_;
    }
    return *this;
  }
  Hdf5Handle(const Hdf5Handle&) = delete;
  Hdf5Handle& operator=(const Hdf5Handle&) = delete;

  hid_t get() const { return id_; }
  bool is_open() const { return id_ >= 0; }

  // Closes now and returns HDF5's status: for a file, a failed close means data never reached it.
  herr_t close() {
    if (id_ < 0) return 0;
    return closer_(std::exchange(id_, H5I_INVALID_HID));
  }
  void reset() { close(); }
  // Forgets the identifier without closing it, for the one place where closing could block: a
  // file opened through MPI-IO, whose close is collective, on a rank that may be alone.
  void release() { id_ = H5I_INVALID_HID; }

 private:
  hid_t id_ = H5I_INVALID_HID;
  Closer closer_ = nullptr;
};

// HDF5 prints its error stack to stderr by default; we report failures as exceptions instead.
// The setting belongs to the calling thread's default error stack, so every entry point sets it.
void silence_hdf5_error_printing() { H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr); }

herr_t collect_error_description(unsigned /*depth*/, const H5E_error2_t* error, void* messages) {
  if (error->desc != nullptr && error->desc[0] != '\0') {
    static_cast<std::vector<std::string>*>(messages)->push_back(error->desc);
  }
  return 0;
}

// HDF5's explanation of the call that just failed: its error stack from the API call inward (the
// innermost entries say why, e.g. "truncated file: eof = ..."), then clears the stack.
std::string hdf5_error_detail() {
  std::vector<std::string> messages;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, collect_error_description, &messages);
  H5Eclear2(H5E_DEFAULT);
  if (messages.empty()) return "HDF5 gave no detail";
  // Repeated frames say the same thing ("unable to open file" at several levels): keep each once.
  std::string detail;
  std::vector<std::string> seen;
  for (const std::string& message : messages) {
    if (std::find(seen.begin(), seen.end(), message) != seen.end()) continue;
    seen.push_back(message);
    detail += (detail.empty() ? "" : "; ") + message;
  }
  return "HDF5: " + detail;
}

[[noreturn]] void throw_hdf5_failure(const std::string& what) {
  throw std::runtime_error(what + " (" + hdf5_error_detail() + ")");
}

// Wraps the identifier an HDF5 create/open call returned, throwing with context if it failed.
Hdf5Handle checked_handle(hid_t id, Hdf5Handle::Closer closer, const std::string& what) {
  if (id < 0) throw_hdf5_failure(what);
  return Hdf5Handle(id, closer);
}

void check_status(herr_t status, const std::string& what) {
  if (status < 0) throw_hdf5_failure(what);
}

// Runs step and returns the message of the std::runtime_error it threw, "" when it succeeded: the
// collective writer must reach the next agreement on every rank, whatever happened locally.
std::string failure_of(const std::function<void()>& step) {
  try {
    step();
    return "";
  } catch (const std::runtime_error& error) {
    return error.what();
  }
}

// MPI calls are allowed: initialised and not yet finalised.
bool mpi_is_active() {
  int initialized = 0;
  int finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized && !finalized;
}

// The file-access property list: the serial default driver, or MPI-IO over comm when comm is not
// MPI_COMM_NULL (every rank of comm then opens the file together; HDF5 duplicates comm).
Hdf5Handle make_file_access_plist(const std::string& path, MPI_Comm comm) {
  Hdf5Handle plist = checked_handle(H5Pcreate(H5P_FILE_ACCESS), H5Pclose,
                                    "cannot create the file-access property list for '" + path + "'");
  if (comm != MPI_COMM_NULL) {
    check_status(H5Pset_fapl_mpio(plist.get(), comm, MPI_INFO_NULL),
                 "cannot select MPI-IO for '" + path + "'");
  }
  // SEMI: closing the file fails loudly if an object inside is still open instead of silently
  // deferring the close (the MPI-IO driver requires SEMI as well).
  check_status(H5Pset_fclose_degree(plist.get(), H5F_CLOSE_SEMI),
               "cannot set the close degree for '" + path + "'");
#if H5_VERSION_GE(1, 10, 7)
  // Keep HDF5's file locks, but do not fail on file systems that do not support them (Lustre and
  // NFS mounts without flock), where HDF5 would otherwise refuse to open any file.
  check_status(H5Pset_file_locking(plist.get(), true, true),
               "cannot set file locking for '" + path + "'");
#endif
  return plist;
}

// The dataset-transfer property list for H5Dwrite/H5Dread: defaults for serial files; collective
// MPI-IO transfers for a file the ranks write together, so MPI-IO can aggregate the ranks' blocks
// into large contiguous writes (two-phase I/O) instead of each rank seeking on its own.
Hdf5Handle make_transfer_plist(const std::string& path, bool collective) {
  Hdf5Handle plist = checked_handle(H5Pcreate(H5P_DATASET_XFER), H5Pclose,
                                    "cannot create the transfer property list for '" + path + "'");
  if (collective) {
    check_status(H5Pset_dxpl_mpio(plist.get(), H5FD_MPIO_COLLECTIVE),
                 "cannot select collective transfers for '" + path + "'");
  }
  return plist;
}

std::string format_shape(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    text += (i ? ", " : "") + std::to_string(shape[i]);
  }
  return text + "]";
}

// The '/'-separated components of a tensor or group name. Empty components (leading, trailing or
// doubled '/') and "." / ".." are rejected: HDF5 would read them as the root or the current group.
std::vector<std::string> split_name(const std::string& name, const std::string& what,
                                    const std::string& path) {
  std::vector<std::string> components;
  size_t begin = 0;
  while (true) {
    const size_t slash = name.find('/', begin);
    const std::string component =
        name.substr(begin, slash == std::string::npos ? std::string::npos : slash - begin);
    if (component.empty() || component == "." || component == "..") {
      throw std::runtime_error("invalid " + what + " name '" + name + "' for checkpoint '" + path +
                               "': names are '/'-separated components, none empty, '.' or '..'");
    }
    components.push_back(component);
    if (slash == std::string::npos) break;
    begin = slash + 1;
  }
  return components;
}

// Whether a link named by name exists below the root, checking each prefix in turn because
// H5Lexists fails (rather than answering false) when an intermediate group is missing.
bool link_exists(hid_t file, const std::string& name, const std::string& path) {
  const std::vector<std::string> components = split_name(name, "tensor", path);
  std::string prefix;
  for (const std::string& component : components) {
    prefix += (prefix.empty() ? "" : "/") + component;
    const htri_t exists = H5Lexists(file, prefix.c_str(), H5P_DEFAULT);
    if (exists < 0) throw_hdf5_failure("cannot look up '" + prefix + "' in '" + path + "'");
    if (exists == 0) return false;
  }
  return true;
}

// The number of elements of a shape, refusing negative dimensions and overflow.
int64_t element_count(const std::vector<int64_t>& shape, const std::string& context) {
  int64_t count = 1;
  for (const int64_t dim : shape) {
    if (dim < 0) throw std::runtime_error(context + ": negative dimension in shape " + format_shape(shape));
    if (__builtin_mul_overflow(count, dim, &count)) {
      throw std::runtime_error(context + ": shape " + format_shape(shape) + " has too many elements");
    }
  }
  return count;
}

// The product of a block's counts; its dimensions are already checked to lie inside a tensor
// whose element count did not overflow, so neither does this.
int64_t block_elements(const std::vector<int64_t>& count) {
  int64_t elements = 1;
  for (const int64_t extent : count) elements *= extent;
  return elements;
}

// The block of whole rows [row_offset, row_offset + n_rows) of a tensor of one or more dimensions.
void rows_as_block(const std::vector<int64_t>& shape, int64_t row_offset, int64_t n_rows,
                   std::vector<int64_t>& offset, std::vector<int64_t>& count) {
  offset.assign(shape.size(), 0);
  count = shape;
  offset[0] = row_offset;
  count[0] = n_rows;
}

// What is wrong with rows [row_offset, row_offset + n_rows) of a tensor of the given shape as a
// transfer from or to data, "" if nothing.
std::string row_range_problem(const std::vector<int64_t>& shape, int64_t row_offset,
                              int64_t n_rows, const void* data, const std::string& context) {
  if (shape.empty()) {
    return context + ": the tensor is a scalar (shape []), it has no rows; use "
                     "write_tensor/read_tensor";
  }
  const int64_t rows = shape[0];
  if (row_offset < 0 || n_rows < 0 || row_offset > rows || n_rows > rows - row_offset) {
    return context + ": " + std::to_string(n_rows) + " rows at row offset " +
           std::to_string(row_offset) + " are not within its " + std::to_string(rows) + " rows";
  }
  std::vector<int64_t> offset;
  std::vector<int64_t> count;
  rows_as_block(shape, row_offset, n_rows, offset, count);
  if (data == nullptr && block_elements(count) > 0) return context + ": null data pointer";
  return "";
}

std::string describe_block(const std::vector<int64_t>& offset, const std::vector<int64_t>& count) {
  return "block at offset " + format_shape(offset) + " of count " + format_shape(count);
}

// What is wrong with the block at offset of count of a tensor of the given shape as a transfer
// from or to data, "" if nothing.
std::string block_problem(const std::vector<int64_t>& shape, const std::vector<int64_t>& offset,
                          const std::vector<int64_t>& count, const void* data,
                          const std::string& context) {
  if (offset.size() != shape.size() || count.size() != shape.size()) {
    return context + ": the " + describe_block(offset, count) + " has " +
           std::to_string(offset.size()) + " and " + std::to_string(count.size()) +
           " dimensions, the tensor has " + std::to_string(shape.size());
  }
  for (size_t dim = 0; dim < shape.size(); ++dim) {
    if (offset[dim] < 0 || count[dim] < 0 || offset[dim] > shape[dim] ||
        count[dim] > shape[dim] - offset[dim]) {
      return context + ": the " + describe_block(offset, count) +
             " is not within the tensor (dimension " + std::to_string(dim) + ": offset " +
             std::to_string(offset[dim]) + " + count " + std::to_string(count[dim]) +
             " exceeds " + std::to_string(shape[dim]) + ", or is negative)";
    }
  }
  if (data == nullptr && block_elements(count) > 0) return context + ": null data pointer";
  return "";
}

// The file and memory dataspaces of one transfer: a block of the dataset (a scalar's one
// element when the dataset is a scalar), or nothing at all, so that a rank without data still
// makes the (collective) transfer call.
struct BlockSelection {
  Hdf5Handle file_space;
  Hdf5Handle memory_space;
};

BlockSelection select_nothing(hid_t dataset, const std::string& context) {
  BlockSelection selection;
  selection.file_space = checked_handle(H5Dget_space(dataset), H5Sclose,
                                        context + ": cannot get the dataspace");
  selection.memory_space = checked_handle(H5Screate(H5S_SCALAR), H5Sclose,
                                          context + ": cannot create the memory dataspace");
  check_status(H5Sselect_none(selection.file_space.get()), context + ": cannot select nothing");
  check_status(H5Sselect_none(selection.memory_space.get()), context + ": cannot select nothing");
  return selection;
}

// The block must lie inside the dataset (block_problem said so).
BlockSelection select_block(hid_t dataset, const std::vector<int64_t>& offset,
                            const std::vector<int64_t>& count, const std::string& context) {
  const int64_t elements = block_elements(count);
  if (elements == 0) return select_nothing(dataset, context);
  BlockSelection selection;
  selection.file_space = checked_handle(H5Dget_space(dataset), H5Sclose,
                                        context + ": cannot get the dataspace");
  if (offset.empty()) {  // a scalar: its dataspace selects its one element already
    selection.memory_space = checked_handle(H5Screate(H5S_SCALAR), H5Sclose,
                                            context + ": cannot create the memory dataspace");
    return selection;
  }
  const std::vector<hsize_t> start(offset.begin(), offset.end());
  const std::vector<hsize_t> extent(count.begin(), count.end());
  check_status(H5Sselect_hyperslab(selection.file_space.get(), H5S_SELECT_SET, start.data(),
                                   nullptr, extent.data(), nullptr),
               context + ": cannot select the " + describe_block(offset, count));
  const hsize_t memory_elements = static_cast<hsize_t>(elements);
  selection.memory_space = checked_handle(H5Screate_simple(1, &memory_elements, nullptr), H5Sclose,
                                          context + ": cannot create the memory dataspace");
  return selection;
}

// A box of a tensor's index space: [begin[d], end[d]) along each dimension d (none for a scalar,
// whose one element is the empty box product).
struct Box {
  std::vector<int64_t> begin;
  std::vector<int64_t> end;

  bool contains(const Box& other) const {
    for (size_t d = 0; d < begin.size(); ++d) {
      if (other.begin[d] < begin[d] || other.end[d] > end[d]) return false;
    }
    return true;
  }
  // The dimension along which this box and other, equal along every other dimension, touch or
  // overlap, so that their union is one box; -1 if there is none.
  int mergeable_dimension(const Box& other) const {
    int differing = -1;
    for (size_t d = 0; d < begin.size(); ++d) {
      if (begin[d] == other.begin[d] && end[d] == other.end[d]) continue;
      if (differing >= 0) return -1;
      differing = static_cast<int>(d);
    }
    if (differing < 0) return 0;  // equal boxes (a scalar's too)
    const size_t d = static_cast<size_t>(differing);
    return other.begin[d] <= end[d] && begin[d] <= other.end[d] ? differing : -1;
  }
};

Box box_of_block(const std::vector<int64_t>& offset, const std::vector<int64_t>& count) {
  Box box{offset, offset};
  for (size_t d = 0; d < count.size(); ++d) box.end[d] += count[d];
  return box;
}

// The blocks written to one tensor on this rank, for commit()'s completeness check. Boxes that
// touch along one dimension and agree along the others are merged as they come, so a tensor
// written in row slabs (in any order) or written twice stays one box however many calls wrote it.
class BlockCoverage {
 public:
  void add(Box box) {
    for (const Box& known : boxes_) {
      if (known.contains(box)) return;
    }
    bool merged = true;
    while (merged) {
      merged = false;
      for (auto it = boxes_.begin(); it != boxes_.end(); ++it) {
        const int dim = box.contains(*it) ? 0 : box.mergeable_dimension(*it);
        if (dim < 0) continue;
        if (!box.begin.empty()) {
          const size_t d = static_cast<size_t>(dim);
          box.begin[d] = std::min(box.begin[d], it->begin[d]);
          box.end[d] = std::max(box.end[d], it->end[d]);
        }
        boxes_.erase(it);
        merged = true;
        break;
      }
    }
    boxes_.push_back(std::move(box));
  }
  const std::vector<Box>& boxes() const { return boxes_; }

 private:
  std::vector<Box> boxes_;
};

// Appends to gaps the boxes of region not covered by the union of blocks (each lying inside
// region along the dimensions below dim, which region fixes), stopping once gaps holds limit
// boxes. Along dimension dim the region is cut at every block edge; in each slice the blocks
// spanning it must cover the slice along the remaining dimensions, checked recursively. Exact for
// any overlap, and cheap for the few boxes per tensor that ranks write.
void find_gaps(const std::vector<const Box*>& blocks, const Box& region, size_t dim, size_t limit,
               std::vector<Box>& gaps) {
  if (gaps.size() >= limit) return;
  if (blocks.empty()) {
    gaps.push_back(region);
    return;
  }
  if (dim == region.begin.size()) return;  // some block covers the whole (fixed) region
  std::vector<int64_t> cuts = {region.begin[dim], region.end[dim]};
  for (const Box* block : blocks) {
    cuts.push_back(std::clamp(block->begin[dim], region.begin[dim], region.end[dim]));
    cuts.push_back(std::clamp(block->end[dim], region.begin[dim], region.end[dim]));
  }
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
  for (size_t i = 0; i + 1 < cuts.size() && gaps.size() < limit; ++i) {
    std::vector<const Box*> spanning;
    for (const Box* block : blocks) {
      if (block->begin[dim] <= cuts[i] && block->end[dim] >= cuts[i + 1]) spanning.push_back(block);
    }
    Box slice = region;
    slice.begin[dim] = cuts[i];
    slice.end[dim] = cuts[i + 1];
    find_gaps(spanning, slice, dim + 1, limit, gaps);
  }
}

// Why blocks do not cover a tensor of the given shape, "" if they do: "has rows never written:
// [1, 2), [3, 4)" when the gaps are whole rows, else the gaps as blocks. `by_whom` follows
// "never written" (" by any of the 4 ranks" for a collective writer).
std::string coverage_problem(const std::vector<int64_t>& shape,
                             const std::vector<const Box*>& blocks, const std::string& by_whom) {
  constexpr size_t kListed = 4;
  // Slices of one gap come out separately when other blocks cut the region: collect more than
  // are listed, then merge neighbours back together.
  constexpr size_t kCollected = 64;
  const Box whole{std::vector<int64_t>(shape.size(), 0), shape};
  std::vector<Box> gaps;
  find_gaps(blocks, whole, 0, kCollected, gaps);
  if (gaps.empty()) return "";
  std::vector<Box> merged;
  for (Box& gap : gaps) {
    if (!merged.empty()) {
      Box& last = merged.back();
      const int dim = last.mergeable_dimension(gap);
      if (dim >= 0 && !gap.begin.empty()) {
        const size_t d = static_cast<size_t>(dim);
        last.begin[d] = std::min(last.begin[d], gap.begin[d]);
        last.end[d] = std::max(last.end[d], gap.end[d]);
        continue;
      }
    }
    merged.push_back(std::move(gap));
  }
  const bool more = gaps.size() >= kCollected || merged.size() > kListed;
  if (shape.empty()) return "was never written" + by_whom;
  const bool whole_rows = std::all_of(merged.begin(), merged.end(), [&](const Box& gap) {
    for (size_t d = 1; d < shape.size(); ++d) {
      if (gap.begin[d] != 0 || gap.end[d] != shape[d]) return false;
    }
    return true;
  });
  std::string listed;
  for (size_t i = 0; i < merged.size() && i < kListed; ++i) {
    const Box& gap = merged[i];
    if (whole_rows) {
      listed += (i ? ", [" : "[") + std::to_string(gap.begin[0]) + ", " +
                std::to_string(gap.end[0]) + ")";
    } else {
      std::vector<int64_t> count(gap.end);
      for (size_t d = 0; d < count.size(); ++d) count[d] -= gap.begin[d];
      listed += (i ? "; " : "") + describe_block(gap.begin, count);
    }
  }
  if (more) listed += whole_rows ? ", ..." : "; ...";
  return std::string(whole_rows ? "has rows never written" : "has elements never written") +
         by_whom + ": " + listed;
}

// One root attribute about to be written (replacing an existing one of that key): everything
// local is prepared first, so that the collective part (delete, create, write) is entered by
// every rank or by none.
struct AttributeWrite {
  std::string key;
  std::string context;
  Hdf5Handle string_type;  // the fixed-length string type of a string value; none for integers
  hid_t file_type = H5I_INVALID_HID;
  hid_t memory_type = H5I_INVALID_HID;
  std::string string_value;
  int64_t int_value = 0;
  bool replaces_existing = false;
  Hdf5Handle space;

  const void* value() const {
    return string_type.is_open() ? static_cast<const void*>(string_value.data()) : &int_value;
  }
};

void prepare_attribute_write(AttributeWrite& write, hid_t file, const std::string& path) {
  write.context = "cannot write attribute '" + write.key + "' of checkpoint '" + path + "'";
  const htri_t exists = H5Aexists(file, write.key.c_str());
  if (exists < 0) throw_hdf5_failure(write.context);
  write.replaces_existing = exists > 0;
  write.space = checked_handle(H5Screate(H5S_SCALAR), H5Sclose, write.context);
}

AttributeWrite prepare_string_attribute(hid_t file, const std::string& key,
                                        const std::string& value, const std::string& path) {
  AttributeWrite write;
  write.key = key;
  prepare_attribute_write(write, file, path);
  // Fixed-length UTF-8, NUL-padded; HDF5 has no zero-length fixed strings, so "" is one NUL.
  write.string_type = checked_handle(H5Tcopy(H5T_C_S1), H5Tclose, write.context);
  write.string_value = value.empty() ? std::string(1, '\0') : value;
  check_status(H5Tset_size(write.string_type.get(), write.string_value.size()), write.context);
  check_status(H5Tset_strpad(write.string_type.get(), H5T_STR_NULLPAD), write.context);
  check_status(H5Tset_cset(write.string_type.get(), H5T_CSET_UTF8), write.context);
  write.file_type = write.string_type.get();
  write.memory_type = write.string_type.get();
  return write;
}

AttributeWrite prepare_int_attribute(hid_t file, const std::string& key, int64_t value,
                                     const std::string& path) {
  AttributeWrite write;
  write.key = key;
  prepare_attribute_write(write, file, path);
  write.file_type = H5T_STD_I64LE;
  write.memory_type = H5T_NATIVE_INT64;
  write.int_value = value;
  return write;
}

// The collective part of an attribute write (every rank passes the same value).
void execute_attribute_write(hid_t file, const AttributeWrite& write) {
  if (write.replaces_existing) {
    check_status(H5Adelete(file, write.key.c_str()), write.context + ": cannot replace it");
  }
  Hdf5Handle attribute = checked_handle(H5Acreate2(file, write.key.c_str(), write.file_type,
                                                   write.space.get(), H5P_DEFAULT, H5P_DEFAULT),
                                        H5Aclose, write.context);
  check_status(H5Awrite(attribute.get(), write.memory_type, write.value()), write.context);
}

// fsync of a file or directory, so a rename is not published before the data it points at.
void fsync_path(const std::string& path, bool is_directory, const std::string& context) {
  const int fd = ::open(path.c_str(), is_directory ? (O_RDONLY | O_DIRECTORY) : O_RDONLY);
  if (fd < 0) {
    throw std::runtime_error(context + ": cannot open '" + path + "' to fsync it: " +
                             std::strerror(errno));
  }
  const int status = ::fsync(fd);
  const int fsync_errno = errno;
  ::close(fd);
  if (status != 0) {
    throw std::runtime_error(context + ": fsync of '" + path + "' failed: " +
                             std::strerror(fsync_errno));
  }
}

// FNV-1a: the cheap fingerprint of a call that the ranks compare.
uint64_t fingerprint(const std::string& text) {
  uint64_t hash = 14695981039346656037ull;
  for (const unsigned char c : text) {
    hash ^= c;
    hash *= 1099511628211ull;
  }
  return hash;
}

// "0, 2-3, 5": ranks listed compactly for messages.
std::string format_ranks(const std::vector<int>& ranks) {
  std::string text;
  for (size_t i = 0; i < ranks.size();) {
    size_t j = i;
    while (j + 1 < ranks.size() && ranks[j + 1] == ranks[j] + 1) ++j;
    text += (text.empty() ? "" : ", ") + std::to_string(ranks[i]);
    if (j > i) text += "-" + std::to_string(ranks[j]);
    i = j + 1;
  }
  return text;
}

// The ranks of a collective writer: a duplicate of the caller's communicator (so the writer's
// agreements never match the caller's own messages), or no communicator for a serial writer,
// which is rank 0 of 1. MPI errors on it are returned, not fatal, and become exceptions.
class RankGroup {
 public:
  RankGroup() = default;
  RankGroup(MPI_Comm comm, const std::string& path) : path_(path) {
    check(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup");
    check(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
  }
  ~RankGroup() { free(); }
  RankGroup(RankGroup&& other) noexcept
      : comm_(std::exchange(other.comm_, MPI_COMM_NULL)),
        rank_(other.rank_),
        size_(other.size_),
        path_(std::move(other.path_)) {}
  RankGroup& operator=(RankGroup&& other) noexcept {
    if (this != &other) {
      free();
      comm_ = std::exchange(other.comm_, MPI_COMM_NULL);
      rank_ = other.rank_;
      size_ = other.size_;
      path_ = std::move(other.path_);
    }
    return *this;
  }
  RankGroup(const RankGroup&) = delete;
  RankGroup& operator=(const RankGroup&) = delete;

  // Whether the communicator is still held (a finished collective writer lets it go).
  bool has_comm() const { return comm_ != MPI_COMM_NULL; }
  MPI_Comm comm() const { return comm_; }
  int rank() const { return rank_; }
  int size() const { return size_; }

  // Frees the communicator: collective, every rank of the group must be here.
  void free() noexcept {
    if (comm_ != MPI_COMM_NULL && mpi_is_active()) MPI_Comm_free(&comm_);
    comm_ = MPI_COMM_NULL;
  }
  // Lets the communicator go without the collective free, for a rank that may be alone.
  void release() noexcept { comm_ = MPI_COMM_NULL; }
  void barrier_noexcept() noexcept {
    if (comm_ != MPI_COMM_NULL && mpi_is_active()) MPI_Barrier(comm_);
  }

  // "" when every rank is making `call` and no rank has a local failure; otherwise one message,
  // the same on every rank: what each rank called when the calls differ, else the lowest failing
  // rank's failure. One all-reduce when all is well. Serially: this rank's failure.
  std::string agreed_failure(const std::string& call, const std::string& local_failure) const {
    if (comm_ == MPI_COMM_NULL) return local_failure;
    const uint64_t call_hash = fingerprint(call);
    // max(hash) == min(hash) exactly when all hashes are equal; min(hash) = ~max(~hash).
    uint64_t summary[3] = {local_failure.empty() ? 0u : 1u, call_hash, ~call_hash};
    check(MPI_Allreduce(MPI_IN_PLACE, summary, 3, MPI_UINT64_T, MPI_MAX, comm_), "MPI_Allreduce");
    if (summary[1] != ~summary[2]) return describe_differing_calls(call, call_hash);
    if (summary[0] == 0) return "";
    int failed[2] = {local_failure.empty() ? size_ : rank_, local_failure.empty() ? 0 : 1};
    int first_failing = failed[0];
    int failing_ranks = failed[1];
    check(MPI_Allreduce(&failed[0], &first_failing, 1, MPI_INT, MPI_MIN, comm_), "MPI_Allreduce");
    check(MPI_Allreduce(&failed[1], &failing_ranks, 1, MPI_INT, MPI_SUM, comm_), "MPI_Allreduce");
    std::string message = local_failure;
    broadcast(message, first_failing);
    return message + " (raised on rank " + std::to_string(first_failing) + " of " +
           std::to_string(size_) +
           (failing_ranks > 1 ? ", the first of " + std::to_string(failing_ranks) + " failing ranks"
                              : "") +
           ")";
  }

  // text of rank root, on every rank.
  void broadcast(std::string& text, int root) const {
    uint64_t length = text.size();
    check(MPI_Bcast(&length, 1, MPI_UINT64_T, root, comm_), "MPI_Bcast");
    text.resize(length);
    for (uint64_t sent = 0; sent < length;) {
      const int piece = static_cast<int>(std::min<uint64_t>(length - sent, INT_MAX));
      check(MPI_Bcast(text.data() + sent, piece, MPI_CHAR, root, comm_), "MPI_Bcast");
      sent += static_cast<uint64_t>(piece);
    }
  }

  void check(int code, const char* call) const {
    if (code == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int length = 0;
    MPI_Error_string(code, text, &length);
    throw std::runtime_error(std::string(call) + " failed while writing checkpoint '" + path_ +
                             "' on rank " + std::to_string(rank_) + " of " +
                             std::to_string(size_) + ": " + std::string(text, length));
  }

 private:
  // The message for ranks making different calls: every rank's call, grouped, the same on all.
  std::string describe_differing_calls(const std::string& call, uint64_t call_hash) const {
    constexpr size_t kShown = 160;  // long attribute values are cut in the message
    const std::string shown = call.size() > kShown ? call.substr(0, kShown) + "..." : call;
    std::vector<uint64_t> hashes(static_cast<size_t>(size_));
    check(MPI_Allgather(&call_hash, 1, MPI_UINT64_T, hashes.data(), 1, MPI_UINT64_T, comm_),
          "MPI_Allgather");
    const int length = static_cast<int>(shown.size());
    std::vector<int> lengths(static_cast<size_t>(size_));
    check(MPI_Allgather(&length, 1, MPI_INT, lengths.data(), 1, MPI_INT, comm_), "MPI_Allgather");
    std::vector<int> displacements(static_cast<size_t>(size_), 0);
    for (size_t r = 1; r < lengths.size(); ++r) {
      displacements[r] = displacements[r - 1] + lengths[r - 1];
    }
    std::string all(static_cast<size_t>(displacements.back() + lengths.back()), '\0');
    check(MPI_Allgatherv(shown.data(), length, MPI_CHAR, all.data(), lengths.data(),
                         displacements.data(), MPI_CHAR, comm_),
          "MPI_Allgatherv");
    // Distinct calls in order of their first rank, each with the ranks that made it.
    std::vector<std::pair<uint64_t, std::vector<int>>> groups;
    for (int r = 0; r < size_; ++r) {
      auto it = std::find_if(groups.begin(), groups.end(),
                             [&](const auto& group) { return group.first == hashes[r]; });
      if (it == groups.end()) {
        groups.push_back({hashes[r], {r}});
      } else {
        it->second.push_back(r);
      }
    }
    // Rank 0's path, so that the message is the same on every rank even when the paths differ.
    std::string path = path_;
    broadcast(path, 0);
    std::string listed;
    for (const auto& [hash, ranks] : groups) {
      const size_t first = static_cast<size_t>(ranks.front());
      listed += (listed.empty() ? "" : "; ") + std::string(ranks.size() > 1 ? "ranks " : "rank ") +
                format_ranks(ranks) + ": " +
                all.substr(static_cast<size_t>(displacements[first]),
                           static_cast<size_t>(lengths[first]));
    }
    return "checkpoint '" + path + "': the " + std::to_string(size_) +
           " ranks of the collective writer made different calls: " + listed +
           ". Every rank must make the same CheckpointWriter calls in the same order, with the "
           "same tensor names, shapes and attribute values";
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
  std::string path_;
};

}  // namespace

// ---- CheckpointWriter ---------------------------------------------------------------------------

struct CheckpointWriter::Impl {
  struct Tensor {
    std::vector<int64_t> shape;
    int64_t element_count = 0;
    Hdf5Handle dataset;
    BlockCoverage written;
  };

  // Declared first, destroyed last: the HDF5 handles below are closed while it still exists.
  RankGroup group;
  bool collective = false;
  std::string final_path;
  std::string tmp_path;
  Hdf5Handle transfer_plist;
  Hdf5Handle file;
  std::map<std::string, Tensor> tensors;
  // open: accepting tensors and attributes; failed_commit: a serial commit() threw after it
  // started changing the file, which is then only fit for removal; ended: an error ended a
  // collective writer on every rank (file closed, tmp removed); committed: renamed onto final_path.
  enum class State { open, failed_commit, ended, committed } state = State::open;
  bool tmp_file_created = false;
  // Exceptions in flight when the writer was made: more at destruction means this rank is
  // unwinding, perhaps alone (see ~Impl).
  int exceptions_in_flight_at_creation = std::uncaught_exceptions();

  // An uncommitted writer takes its tmp file with it: nothing half-written stays behind.
  ~Impl() {
    if (!tmp_file_created || state == State::committed) return;
    const bool unwinding = std::uncaught_exceptions() > exceptions_in_flight_at_creation;
    if (collective && (unwinding || !mpi_is_active())) {
      // Closing an MPI-IO file is collective, and this rank may be unwinding an exception the
      // other ranks never saw (a writer's own errors end it on every rank before they are
      // thrown, so they never get here): waiting for them could hang the job instead of letting
      // this process fail. Leave the handles to HDF5, which closes its files when MPI finalises.
      for (auto& entry : tensors) entry.second.dataset.release();
      file.release();
      transfer_plist.reset();
      if (group.rank() == 0) ::unlink(tmp_path.c_str());
      group.release();
      return;
    }
    tensors.clear();
    file.reset();  // collective in collective mode: every rank destroys the writer together
    if (group.rank() == 0) ::unlink(tmp_path.c_str());
    group.barrier_noexcept();  // no rank returns while the tmp file is still there
    group.free();
  }

  std::string tensor_context(const std::string& name) const {
    return "checkpoint '" + final_path + "', tensor '" + name + "'";
  }

  void check_open(const char* operation) const {
    if (state == State::open) return;
    const char* why = state == State::committed       ? "it is already committed"
                      : state == State::failed_commit ? "an earlier commit() failed"
                                                      : "an earlier error ended this collective writer";
    throw std::runtime_error(std::string("cannot ") + operation + " checkpoint '" + final_path +
                             "': " + why);
  }

  Tensor* find_tensor(const std::string& name) {
    auto found = tensors.find(name);
    return found == tensors.end() ? nullptr : &found->second;
  }

  std::string missing_tensor_problem(const std::string& name) const {
    return tensor_context(name) + ": no such tensor in this writer (create_tensor it first)";
  }

  // The agreement point of every call (see the top of this file): throws `failure` (this rank's,
  // or in collective mode the one every rank agreed on) if there is one. A collective writer is
  // ended on every rank before the error leaves, so the destructor has nothing collective left.
  void settle(const std::string& call, const std::string& local_failure) {
    const std::string failure = group.agreed_failure(call, local_failure);
    if (failure.empty()) return;
    if (collective) end_everywhere();
    throw std::runtime_error(failure);
  }

  // After an error raised on every rank: closes the file (collectively), removes the tmp file and
  // lets the communicator go. Every rank of the group is here.
  void end_everywhere() noexcept {
    if (state != State::committed) state = State::ended;
    tensors.clear();
    file.reset();
    if (tmp_file_created && group.rank() == 0) ::unlink(tmp_path.c_str());
    tmp_file_created = false;
    group.barrier_noexcept();  // no rank looks for the tmp file before it is gone
    group.free();
  }

  // Creates the tmp file (constructor).
  void create_file(const std::string& path) {
    final_path = path;
    tmp_path = path + ".tmp";
    const std::string call = "CheckpointWriter('" + path + "')";
    settle(call, path.empty() || path.back() == '/'
                     ? "invalid checkpoint path '" + path + "': it must name a file"
                     : "");

    std::string failure;
    if (group.rank() == 0) {  // the other ranks wait at settle until the directories exist
      const fs::path parent = fs::path(final_path).parent_path();
      if (!parent.empty()) {
        std::error_code error;
        fs::create_directories(parent, error);
        if (error) {
          failure = "cannot create directory '" + parent.string() + "' for checkpoint '" +
                    final_path + "': " + error.message();
        }
      }
    }
    settle(call, failure);

    Hdf5Handle access_plist;
    failure = failure_of([&] {
      access_plist = make_file_access_plist(tmp_path, group.comm());
      transfer_plist = make_transfer_plist(tmp_path, collective);
    });
    settle(call, failure);
    // MPI_File_open, under H5Fcreate, is collective and fails on every rank alike.
    failure = failure_of([&] {
      file = checked_handle(
          H5Fcreate(tmp_path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, access_plist.get()), H5Fclose,
          "cannot create '" + tmp_path + "' to write checkpoint '" + final_path + "'");
      tmp_file_created = true;
    });
    settle(call, failure);
  }

  // Writes this rank's block of a tensor, or nothing when `block_offset` is null; `problem` is
  // what is wrong with the request on this rank ("" if nothing). Collectively every rank calls it
  // for the same tensor and the transfer is one collective MPI-IO write.
  void write_block(const std::string& name, const std::vector<int64_t>* block_offset,
                   const std::vector<int64_t>* block_count, const float* data,
                   const std::string& problem) {
    // The same for write_rows, write_block and write_tensor: ranks may describe their blocks
    // either way (an owner its rows, the others an empty block).
    const std::string call = "a write of tensor '" + name + "'";
    BlockSelection selection;
    std::string failure = problem;
    if (failure.empty()) {
      failure = failure_of([&] {
        Tensor& tensor = tensors.at(name);
        const std::string context =
            tensor_context(name) + " of shape " + format_shape(tensor.shape);
        selection = block_offset != nullptr
                        ? select_block(tensor.dataset.get(), *block_offset, *block_count, context)
                        : select_nothing(tensor.dataset.get(), context);
      });
    }
    settle(call, failure);

    Tensor& tensor = tensors.at(name);
    // A tensor without elements has no storage in the file, and parallel HDF5 fails even an empty
    // collective transfer to it; its shape is the same on every rank, so all skip it alike.
    if (tensor.element_count == 0) return;
    failure = "";
    if (H5Dwrite(tensor.dataset.get(), H5T_NATIVE_FLOAT, selection.memory_space.get(),
                 selection.file_space.get(), transfer_plist.get(), data) < 0) {
      const std::string what =
          block_offset == nullptr ? std::string("nothing")
          : tensor.shape.empty()  ? std::string("the value")
                                  : "the " + describe_block(*block_offset, *block_count);
      failure = "cannot write " + what + " of " + tensor_context(name) + " of shape " +
                format_shape(tensor.shape) + " (" + hdf5_error_detail() + ")";
    }
    settle(call, failure);
    if (block_offset != nullptr && block_elements(*block_count) > 0) {
      tensor.written.add(box_of_block(*block_offset, *block_count));
    }
  }

  void set_attribute(const std::string& key, const std::string& call,
                     const std::function<AttributeWrite()>& prepare) {
    check_open("set an attribute of");
    AttributeWrite write;
    std::string failure;
    if (key.empty() || key == kFormatKey || key == kFormatVersionKey || key == kCompleteKey) {
      failure = "checkpoint '" + final_path + "': attribute key '" + key +
                "' is empty or reserved for the file format";
    } else {
      failure = failure_of([&] { write = prepare(); });
    }
    settle(call, failure);
    settle(call, failure_of([&] { execute_attribute_write(file.get(), write); }));
  }

  // One of commit()'s attributes, written by every rank alike.
  void write_format_attribute(const std::string& call,
                              const std::function<AttributeWrite()>& prepare) {
    AttributeWrite write;
    settle(call, failure_of([&] { write = prepare(); }));
    settle(call, failure_of([&] { execute_attribute_write(file.get(), write); }));
  }

  // commit()'s completeness check (see checkpoint_file.h); throws naming the first incomplete
  // tensor. Tensor t is checked by rank t mod size, from the boxes every rank sends it.
  void check_coverage(const std::string& call, const std::string& context) {
    std::vector<const std::string*> names;
    std::vector<const Tensor*> by_index;
    for (const auto& [name, tensor] : tensors) {
      names.push_back(&name);
      by_index.push_back(&tensor);
    }
    const size_t ranks = static_cast<size_t>(group.size());
    const size_t rank = static_cast<size_t>(group.rank());
    std::vector<std::vector<Box>> received(by_index.size());  // for the tensors this rank checks

    if (!collective) {
      for (size_t t = 0; t < by_index.size(); ++t) received[t] = by_index[t]->written.boxes();
    } else {
      // One record per box: the tensor's index, then begin and end along each dimension.
      std::vector<std::vector<int64_t>> outgoing(ranks);
      for (size_t t = 0; t < by_index.size(); ++t) {
        if (by_index[t]->element_count == 0) continue;
        std::vector<int64_t>& records = outgoing[t % ranks];
        for (const Box& box : by_index[t]->written.boxes()) {
          records.push_back(static_cast<int64_t>(t));
          records.insert(records.end(), box.begin.begin(), box.begin.end());
          records.insert(records.end(), box.end.begin(), box.end.end());
        }
      }
      std::vector<int> send_counts(ranks);
      std::string failure;
      for (size_t r = 0; r < ranks; ++r) {
        if (outgoing[r].size() > static_cast<size_t>(INT_MAX)) {
          failure = context + ": more block coordinates for rank " + std::to_string(r) +
                    " than one MPI message holds";
        }
        send_counts[r] = static_cast<int>(std::min<size_t>(outgoing[r].size(), INT_MAX));
      }
      settle(call, failure);
      std::vector<int> receive_counts(ranks);
      group.check(MPI_Alltoall(send_counts.data(), 1, MPI_INT, receive_counts.data(), 1, MPI_INT,
                               group.comm()),
                  "MPI_Alltoall");
      std::vector<int> send_offsets(ranks, 0);
      std::vector<int> receive_offsets(ranks, 0);
      std::vector<int64_t> sent;
      int64_t receive_total = 0;
      for (size_t r = 0; r < ranks; ++r) {
        send_offsets[r] = static_cast<int>(sent.size());
        sent.insert(sent.end(), outgoing[r].begin(), outgoing[r].end());
        receive_offsets[r] = static_cast<int>(std::min<int64_t>(receive_total, INT_MAX));
        receive_total += receive_counts[r];
      }
      settle(call, sent.size() > static_cast<size_t>(INT_MAX) || receive_total > INT_MAX
                       ? context + ": more block coordinates than one MPI exchange holds"
                       : "");
      std::vector<int64_t> incoming(static_cast<size_t>(receive_total));
      group.check(MPI_Alltoallv(sent.data(), send_counts.data(), send_offsets.data(), MPI_INT64_T,
                                incoming.data(), receive_counts.data(), receive_offsets.data(),
                                MPI_INT64_T, group.comm()),
                  "MPI_Alltoallv");
      for (size_t i = 0; i < incoming.size();) {
        const size_t t = static_cast<size_t>(incoming[i]);
        const size_t dims = by_index[t]->shape.size();
        Box box;
        box.begin.assign(incoming.begin() + static_cast<std::ptrdiff_t>(i + 1),
                         incoming.begin() + static_cast<std::ptrdiff_t>(i + 1 + dims));
        box.end.assign(incoming.begin() + static_cast<std::ptrdiff_t>(i + 1 + dims),
                       incoming.begin() + static_cast<std::ptrdiff_t>(i + 1 + 2 * dims));
        received[t].push_back(std::move(box));
        i += 1 + 2 * dims;
      }
    }

    const std::string by_whom =
        collective ? " by any of the " + std::to_string(ranks) + " ranks" : std::string();
    int64_t first_incomplete = std::numeric_limits<int64_t>::max();
    int64_t incomplete = 0;
    std::string first_problem;
    for (size_t t = rank; t < by_index.size(); t += ranks) {
      if (by_index[t]->element_count == 0) continue;
      std::vector<const Box*> blocks;
      for (const Box& box : received[t]) blocks.push_back(&box);
      const std::string problem = coverage_problem(by_index[t]->shape, blocks, by_whom);
      if (problem.empty()) continue;
      ++incomplete;
      if (first_problem.empty()) {
        first_incomplete = static_cast<int64_t>(t);
        first_problem = context + ": tensor '" + *names[t] + "' of shape " +
                        format_shape(by_index[t]->shape) + " " + problem;
      }
    }
    if (collective) {
      // Agreed on every rank: the first incomplete tensor by name, reported by its checker.
      group.check(MPI_Allreduce(MPI_IN_PLACE, &incomplete, 1, MPI_INT64_T, MPI_SUM, group.comm()),
                  "MPI_Allreduce");
      if (incomplete == 0) return;
      group.check(MPI_Allreduce(MPI_IN_PLACE, &first_incomplete, 1, MPI_INT64_T, MPI_MIN,
                                group.comm()),
                  "MPI_Allreduce");
      const size_t checker = static_cast<size_t>(first_incomplete) % ranks;
      group.broadcast(first_problem, static_cast<int>(checker));
    }
    if (incomplete == 0) return;
    if (incomplete > 1) {
      first_problem += " (and " + std::to_string(incomplete - 1) + " more incomplete tensor" +
                       (incomplete > 2 ? "s" : "") + ")";
    }
    if (collective) end_everywhere();  // serially the writer stays usable: write the rest, retry
    throw std::runtime_error(first_problem);
  }
};

CheckpointWriter::CheckpointWriter(const std::string& final_path) : impl_(std::make_unique<Impl>()) {
  silence_hdf5_error_printing();
  impl_->create_file(final_path);
}

CheckpointWriter::CheckpointWriter(const std::string& final_path, MPI_Comm comm)
    : impl_(std::make_unique<Impl>()) {
  silence_hdf5_error_printing();
  if (comm != MPI_COMM_NULL) {
    if (!mpi_is_active()) {
      throw std::runtime_error("cannot write checkpoint '" + final_path +
                               "' over an MPI communicator: MPI is not initialised, or already "
                               "finalised");
    }
    int size = 0;
    const int status = MPI_Comm_size(comm, &size);
    if (status != MPI_SUCCESS) {
      throw std::runtime_error("cannot write checkpoint '" + final_path +
                               "': MPI_Comm_size failed on the communicator given");
    }
    if (size > 1) {
      impl_->group = RankGroup(comm, final_path);
      impl_->collective = true;
    }
  }
  impl_->create_file(final_path);
}

CheckpointWriter::~CheckpointWriter() = default;
CheckpointWriter::CheckpointWriter(CheckpointWriter&&) noexcept = default;
CheckpointWriter& CheckpointWriter::operator=(CheckpointWriter&&) noexcept = default;

const std::string& CheckpointWriter::final_path() const { return impl_->final_path; }
const std::string& CheckpointWriter::tmp_path() const { return impl_->tmp_path; }
bool CheckpointWriter::collective() const { return impl_->collective; }

void CheckpointWriter::create_tensor(const std::string& name, const std::vector<int64_t>& shape) {
  Impl& impl = *impl_;
  impl.check_open("add a tensor to");
  const std::string context = impl.tensor_context(name);
  const std::string call = "create_tensor('" + name + "', " + format_shape(shape) + ")";

  Impl::Tensor tensor;
  Hdf5Handle space;
  Hdf5Handle link_plist;
  Hdf5Handle create_plist;
  std::string failure = failure_of([&] {
    split_name(name, "tensor", impl.final_path);
    tensor.element_count = element_count(shape, context);
    if (impl.tensors.count(name)) throw std::runtime_error(context + ": created twice");
    // A name cannot be both a tensor and a group: report it here rather than as an HDF5 failure.
    for (size_t slash = name.find('/'); slash != std::string::npos; slash = name.find('/', slash + 1)) {
      const std::string prefix = name.substr(0, slash);
      if (impl.tensors.count(prefix)) {
        throw std::runtime_error(context + ": '" + prefix + "' is already a tensor, not a group");
      }
    }
    const auto below = impl.tensors.lower_bound(name + "/");
    if (below != impl.tensors.end() && below->first.compare(0, name.size() + 1, name + "/") == 0) {
      throw std::runtime_error(context + ": already a group (holding '" + below->first + "')");
    }

    const std::vector<hsize_t> dims(shape.begin(), shape.end());
    space = checked_handle(
        shape.empty() ? H5Screate(H5S_SCALAR)
                      : H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr),
        H5Sclose, context + ": cannot create the dataspace for shape " + format_shape(shape));
    link_plist = checked_handle(H5Pcreate(H5P_LINK_CREATE), H5Pclose, context);
    check_status(H5Pset_create_intermediate_group(link_plist.get(), 1), context);
    create_plist = checked_handle(H5Pcreate(H5P_DATASET_CREATE), H5Pclose, context);
    // Contiguous storage is what parallel HDF5 writes collectively without chunk bookkeeping, and
    // since commit() insists every element is written, a fill pass would only double the I/O.
    check_status(H5Pset_layout(create_plist.get(), H5D_CONTIGUOUS), context);
    check_status(H5Pset_fill_time(create_plist.get(), H5D_FILL_TIME_NEVER), context);
  });
  impl.settle(call, failure);

  failure = failure_of([&] {
    tensor.dataset = checked_handle(H5Dcreate2(impl.file.get(), name.c_str(), H5T_IEEE_F32LE,
                                               space.get(), link_plist.get(), create_plist.get(),
                                               H5P_DEFAULT),
                                    H5Dclose,
                                    "cannot create " + context + " of shape " + format_shape(shape));
  });
  impl.settle(call, failure);
  tensor.shape = shape;
  impl.tensors.emplace(name, std::move(tensor));
}

void CheckpointWriter::write_block(const std::string& name, const std::vector<int64_t>& offset,
                                   const std::vector<int64_t>& count, const float* data) {
  impl_->check_open("write to");
  const Impl::Tensor* tensor = impl_->find_tensor(name);
  const std::string problem =
      tensor == nullptr
          ? impl_->missing_tensor_problem(name)
          : block_problem(tensor->shape, offset, count, data,
                          impl_->tensor_context(name) + " of shape " + format_shape(tensor->shape));
  impl_->write_block(name, &offset, &count, data, problem);
}

void CheckpointWriter::write_rows(const std::string& name, int64_t row_offset, int64_t n_rows,
                                  const float* data) {
  impl_->check_open("write to");
  const Impl::Tensor* tensor = impl_->find_tensor(name);
  std::vector<int64_t> offset;
  std::vector<int64_t> count;
  std::string problem;
  if (tensor == nullptr) {
    problem = impl_->missing_tensor_problem(name);
  } else {
    problem = row_range_problem(tensor->shape, row_offset, n_rows, data,
                                impl_->tensor_context(name) + " of shape " +
                                    format_shape(tensor->shape));
    if (problem.empty()) rows_as_block(tensor->shape, row_offset, n_rows, offset, count);
  }
  impl_->write_block(name, &offset, &count, data, problem);
}

void CheckpointWriter::write_tensor(const std::string& name, const std::vector<int64_t>& shape,
                                    const float* data) {
  create_tensor(name, shape);
  Impl& impl = *impl_;
  const Impl::Tensor& tensor = impl.tensors.at(name);
  // A replicated tensor: rank 0 (the only rank of a serial writer) writes it, the others nothing.
  const bool writes = impl.group.rank() == 0;
  const std::string problem = writes && data == nullptr && tensor.element_count > 0
                                  ? impl.tensor_context(name) + ": null data pointer"
                                  : "";
  const std::vector<int64_t> offset(shape.size(), 0);
  impl.write_block(name, writes ? &offset : nullptr, writes ? &shape : nullptr, data, problem);
}

void CheckpointWriter::set_attribute(const std::string& key, const std::string& value) {
  Impl& impl = *impl_;
  const std::string call = "set_attribute('" + key + "', \"" + value + "\")";
  impl.set_attribute(key, call, [&] {
    if (value.find('\0') != std::string::npos) {
      throw std::runtime_error("checkpoint '" + impl.final_path + "': the value of attribute '" +
                               key + "' contains a NUL byte");
    }
    return prepare_string_attribute(impl.file.get(), key, value, impl.final_path);
  });
}

void CheckpointWriter::set_attribute(const std::string& key, int64_t value) {
  Impl& impl = *impl_;
  const std::string call = "set_attribute('" + key + "', " + std::to_string(value) + ")";
  impl.set_attribute(key, call, [&] {
    return prepare_int_attribute(impl.file.get(), key, value, impl.final_path);
  });
}

void CheckpointWriter::commit() {
  Impl& impl = *impl_;
  impl.check_open("commit");
  const std::string context = "cannot commit checkpoint '" + impl.final_path + "'";
  const std::string call = "commit()";
  impl.settle(call, "");  // every rank is committing, or none goes on

  // A forgotten block would otherwise resume silently as whatever bytes the disk held.
  impl.check_coverage(call, context);

  // From here on a failure leaves the file half-finalised: the writer only removes it. Each
  // collective HDF5 step is settled on its own, so no rank enters the next one after a failure.
  if (!impl.collective) impl.state = Impl::State::failed_commit;
  impl.write_format_attribute(call, [&] {
    return prepare_string_attribute(impl.file.get(), kFormatKey, kCheckpointFormat,
                                    impl.final_path);
  });
  impl.write_format_attribute(call, [&] {
    return prepare_int_attribute(impl.file.get(), kFormatVersionKey, kCheckpointFormatVersion,
                                 impl.final_path);
  });
  impl.tensors.clear();  // closes the datasets: the file must have no open objects to close
  // The rename below is what publishes the file atomically; the marker, written last, lets a
  // reader refuse files that never went through a finished commit (e.g. a tmp copied by hand).
  impl.write_format_attribute(call, [&] {
    return prepare_int_attribute(impl.file.get(), kCompleteKey, 1, impl.final_path);
  });
  // Collectively the flush is MPI_File_sync on every rank: each rank's data is on disk before
  // rank 0 publishes the file.
  impl.settle(call, failure_of([&] {
    check_status(H5Fflush(impl.file.get(), H5F_SCOPE_GLOBAL), context + ": flush failed");
  }));
  impl.settle(call, failure_of([&] {
    check_status(impl.file.close(), context + ": closing '" + impl.tmp_path + "' failed");
  }));

  // Rank 0 publishes; the others wait at the settle that follows, so no rank returns before the
  // rename, and every rank sees the final file once commit() returns.
  std::string failure;
  if (impl.group.rank() == 0) {
    failure = failure_of([&] {
      fsync_path(impl.tmp_path, false, context);
      if (std::rename(impl.tmp_path.c_str(), impl.final_path.c_str()) != 0) {
        throw std::runtime_error(context + ": cannot rename '" + impl.tmp_path + "' to '" +
                                 impl.final_path + "': " + std::strerror(errno));
      }
    });
    // The tmp file is gone: nothing for the destructor to remove.
    if (failure.empty()) impl.state = Impl::State::committed;
  }
  impl.settle(call, failure);
  impl.state = Impl::State::committed;
  impl.tmp_file_created = false;
  failure.clear();
  if (impl.group.rank() == 0) {
    failure = failure_of([&] {
      const fs::path parent = fs::path(impl.final_path).parent_path();
      fsync_path(parent.empty() ? "." : parent.string(), true, context);
    });
  }
  impl.settle(call, failure);
  impl.group.free();  // every rank is here; a committed writer makes no more collective calls
}
// ---- CheckpointReader ---------------------------------------------------------------------------

struct CheckpointReader::Impl {
  std::string path;
  Hdf5Handle file;
  Hdf5Handle transfer_plist;

  std::string tensor_context(const std::string& name) const {
    return "checkpoint '" + path + "', tensor '" + name + "'";
  }

  // The object at name, which must exist; its HDF5 identifier type tells group from dataset.
  Hdf5Handle open_object(const std::string& name, const std::string& what) const {
    if (!link_exists(file.get(), name, path)) {
      throw std::runtime_error("checkpoint '" + path + "' has no " + what + " '" + name + "'");
    }
    return checked_handle(H5Oopen(file.get(), name.c_str(), H5P_DEFAULT), H5Oclose,
                          "cannot open '" + name + "' in checkpoint '" + path + "'");
  }

  // The dataset of a tensor, checked to hold floating-point values (read as fp32).
  Hdf5Handle open_tensor(const std::string& name) const {
    Hdf5Handle object = open_object(name, "tensor");
    if (H5Iget_type(object.get()) != H5I_DATASET) {
      throw std::runtime_error(tensor_context(name) + ": this is a group, not a tensor");
    }
    Hdf5Handle type = checked_handle(H5Dget_type(object.get()), H5Tclose,
                                     "cannot get the type of " + tensor_context(name));
    if (H5Tget_class(type.get()) != H5T_FLOAT) {
      throw std::runtime_error(tensor_context(name) + ": not a floating-point dataset");
    }
    return object;
  }

  std::vector<int64_t> dataset_shape(hid_t dataset, const std::string& name) const {
    Hdf5Handle space = checked_handle(H5Dget_space(dataset), H5Sclose,
                                      "cannot get the dataspace of " + tensor_context(name));
    const H5S_class_t space_class = H5Sget_simple_extent_type(space.get());
    if (space_class == H5S_SCALAR) return {};
    if (space_class != H5S_SIMPLE) {
      throw std::runtime_error(tensor_context(name) + ": the dataset has no shape (null dataspace)");
    }
    const int rank = H5Sget_simple_extent_ndims(space.get());
    if (rank < 0) throw_hdf5_failure("cannot get the rank of " + tensor_context(name));
    std::vector<hsize_t> dims(static_cast<size_t>(rank));
    check_status(H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr),
                 "cannot get the shape of " + tensor_context(name));
    return std::vector<int64_t>(dims.begin(), dims.end());
  }

  // Reads a block that block_problem accepted (nothing for an empty one) into out.
  void read_selection(hid_t dataset, const std::vector<int64_t>& offset,
                      const std::vector<int64_t>& count, float* out,
                      const std::string& what) const {
    if (block_elements(count) == 0) return;
    BlockSelection selection = select_block(dataset, offset, count, what);
    check_status(H5Dread(dataset, H5T_NATIVE_FLOAT, selection.memory_space.get(),
                         selection.file_space.get(), transfer_plist.get(), out),
                 what);
  }

  Hdf5Handle open_attribute(const std::string& key) const {
    const std::string context = "checkpoint '" + path + "'";
    const htri_t exists = H5Aexists(file.get(), key.c_str());
    if (exists < 0) throw_hdf5_failure("cannot look up attribute '" + key + "' of " + context);
    if (exists == 0) throw std::runtime_error(context + " has no attribute '" + key + "'");
    Hdf5Handle attribute = checked_handle(H5Aopen(file.get(), key.c_str(), H5P_DEFAULT), H5Aclose,
                                          "cannot open attribute '" + key + "' of " + context);
    Hdf5Handle space = checked_handle(H5Aget_space(attribute.get()), H5Sclose,
                                      "cannot get the dataspace of attribute '" + key + "' of " + context);
    if (H5Sget_simple_extent_npoints(space.get()) != 1) {
      throw std::runtime_error("attribute '" + key + "' of " + context + " is not a single value");
    }
    return attribute;
  }

  // The class of an attribute's stored type (H5T_STRING, H5T_INTEGER, ...).
  static H5T_class_t attribute_class(hid_t attribute, const std::string& context) {
    Hdf5Handle type = checked_handle(H5Aget_type(attribute), H5Tclose, context);
    return H5Tget_class(type.get());
  }
};

namespace {

std::string describe_class(H5T_class_t type_class) {
  switch (type_class) {
    case H5T_STRING: return "a string";
    case H5T_INTEGER: return "an integer";
    case H5T_FLOAT: return "a float";
    default: return "neither a string nor an integer";
  }
}

}  // namespace

CheckpointReader::CheckpointReader(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CheckpointReader::~CheckpointReader() = default;
CheckpointReader::CheckpointReader(CheckpointReader&&) noexcept = default;
CheckpointReader& CheckpointReader::operator=(CheckpointReader&&) noexcept = default;

const std::string& CheckpointReader::path() const { return impl_->path; }

CheckpointReader CheckpointReader::open(const std::string& path) {
  silence_hdf5_error_printing();
  const std::string quoted = "'" + path + "'";
  std::error_code error;
  const fs::file_status status = fs::status(path, error);
  if (!fs::exists(status)) {
    throw std::runtime_error("checkpoint " + quoted + " does not exist");
  }
  if (!fs::is_regular_file(status)) {
    throw std::runtime_error("checkpoint " + quoted + " is not a regular file");
  }
  const htri_t is_hdf5 = H5Fis_hdf5(path.c_str());
  if (is_hdf5 < 0) throw_hdf5_failure("cannot read checkpoint " + quoted);
  if (is_hdf5 == 0) {
    throw std::runtime_error(quoted + " is not a freqkv checkpoint: it is not an HDF5 file (no "
                             "HDF5 signature)");
  }

  auto impl = std::make_unique<Impl>();
  impl->path = path;
  Hdf5Handle access_plist = make_file_access_plist(path, MPI_COMM_NULL);
  const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDONLY, access_plist.get());
  if (file < 0) {
    throw std::runtime_error(quoted + " is truncated or corrupt: HDF5 cannot open it (" +
                             hdf5_error_detail() + ")");
  }
  impl->file = Hdf5Handle(file, H5Fclose);
  impl->transfer_plist = make_transfer_plist(path, false);
  CheckpointReader reader(std::move(impl));

  if (!reader.has_attribute(kFormatKey)) {
    throw std::runtime_error(quoted + " is not a freqkv checkpoint (no '" + kFormatKey +
                             "' attribute): was it written by another program?");
  }
  const H5T_class_t format_class = Impl::attribute_class(
      reader.impl_->open_attribute(kFormatKey).get(), "cannot read the format of " + quoted);
  const std::string format =
      format_class == H5T_STRING ? reader.string_attribute(kFormatKey) : std::string();
  if (format_class != H5T_STRING || format != kCheckpointFormat) {
    const std::string found =
        format_class == H5T_STRING ? "'" + format + "'" : describe_class(format_class);
    throw std::runtime_error(quoted + " is not a freqkv checkpoint: its '" + kFormatKey +
                             "' attribute is " + found + ", expected '" + kCheckpointFormat + "'");
  }
  if (!reader.has_attribute(kFormatVersionKey)) {
    throw std::runtime_error(quoted + " is corrupt: it has no '" + kFormatVersionKey +
                             "' attribute");
  }
  const int64_t version = reader.int_attribute(kFormatVersionKey);
  if (version != kCheckpointFormatVersion) {
    throw std::runtime_error(quoted + " has format_version " + std::to_string(version) +
                             ", but this freqkv reads only version " +
                             std::to_string(kCheckpointFormatVersion) +
                             (version > kCheckpointFormatVersion ? " (written by a newer freqkv?)"
                                                                 : ""));
  }
  if (!reader.has_attribute(kCompleteKey) || reader.int_attribute(kCompleteKey) != 1) {
    throw std::runtime_error(quoted + " is incomplete: it lacks the '" + kCompleteKey +
                             "' marker, so its writer never finished");
  }
  return reader;
}

std::vector<std::string> CheckpointReader::tensor_names(const std::string& group) const {
  Hdf5Handle start;
  std::string prefix;
  if (group.empty()) {
    start = checked_handle(H5Gopen2(impl_->file.get(), "/", H5P_DEFAULT), H5Gclose,
                           "cannot open the root group of checkpoint '" + impl_->path + "'");
  } else {
    if (!link_exists(impl_->file.get(), group, impl_->path)) return {};
    start = impl_->open_object(group, "group");
    if (H5Iget_type(start.get()) != H5I_GROUP) {
      throw std::runtime_error("checkpoint '" + impl_->path + "': '" + group +
                               "' is a tensor, not a group");
    }
    prefix = group + "/";
  }

  struct VisitState {
    std::vector<std::string> names;
    std::string prefix;
    std::string failure;
  } state{{}, prefix, {}};
  // The link-info type differs between HDF5 1.10 (H5L_info_t) and 1.12+ (H5L_info2_t); the
  // generic lambda converts to whichever callback type this HDF5 declares.
  const herr_t visited = H5Lvisit(
      start.get(), H5_INDEX_NAME, H5_ITER_INC,
      [](hid_t group_id, const char* name, const auto* info, void* data) -> herr_t {
        auto* visit = static_cast<VisitState*>(data);
        if (info->type != H5L_TYPE_HARD) return 0;  // soft/external links are not our tensors
        const hid_t object = H5Oopen(group_id, name, H5P_DEFAULT);
        if (object < 0) {
          visit->failure = std::string("cannot open '") + name + "'";
          return -1;
        }
        const bool is_dataset = H5Iget_type(object) == H5I_DATASET;
        H5Oclose(object);
        if (is_dataset) visit->names.push_back(visit->prefix + name);
        return 0;
      },
      &state);
  if (visited < 0) {
    throw_hdf5_failure("cannot list the tensors of checkpoint '" + impl_->path + "'" +
                       (state.failure.empty() ? "" : ": " + state.failure));
  }
  std::sort(state.names.begin(), state.names.end());
  return state.names;
}

bool CheckpointReader::has_tensor(const std::string& name) const {
  if (!link_exists(impl_->file.get(), name, impl_->path)) return false;
  Hdf5Handle object = impl_->open_object(name, "tensor");
  return H5Iget_type(object.get()) == H5I_DATASET;
}

std::vector<int64_t> CheckpointReader::shape(const std::string& name) const {
  Hdf5Handle dataset = impl_->open_tensor(name);
  return impl_->dataset_shape(dataset.get(), name);
}

void CheckpointReader::read_block(const std::string& name, const std::vector<int64_t>& offset,
                                  const std::vector<int64_t>& count, float* out) const {
  Hdf5Handle dataset = impl_->open_tensor(name);
  const std::vector<int64_t> shape = impl_->dataset_shape(dataset.get(), name);
  const std::string context = impl_->tensor_context(name) + " of shape " + format_shape(shape);
  const std::string problem = block_problem(shape, offset, count, out, context);
  if (!problem.empty()) throw std::runtime_error(problem);
  impl_->read_selection(dataset.get(), offset, count, out,
                        "cannot read the " + describe_block(offset, count) + " of " + context);
}

void CheckpointReader::read_rows(const std::string& name, int64_t row_offset, int64_t n_rows,
                                 float* out) const {
  Hdf5Handle dataset = impl_->open_tensor(name);
  const std::vector<int64_t> shape = impl_->dataset_shape(dataset.get(), name);
  const std::string context = impl_->tensor_context(name) + " of shape " + format_shape(shape);
  const std::string problem = row_range_problem(shape, row_offset, n_rows, out, context);
  if (!problem.empty()) throw std::runtime_error(problem);
  std::vector<int64_t> offset;
  std::vector<int64_t> count;
  rows_as_block(shape, row_offset, n_rows, offset, count);
  impl_->read_selection(dataset.get(), offset, count, out,
                        "cannot read rows [" + std::to_string(row_offset) + ", " +
                            std::to_string(row_offset + n_rows) + ") of " + context);
}

std::vector<float> CheckpointReader::read_tensor(const std::string& name) const {
  Hdf5Handle dataset = impl_->open_tensor(name);
  const std::vector<int64_t> shape = impl_->dataset_shape(dataset.get(), name);
  const std::string context = impl_->tensor_context(name) + " of shape " + format_shape(shape);
  std::vector<float> values(static_cast<size_t>(element_count(shape, context)));
  if (values.empty()) return values;
  check_status(H5Dread(dataset.get(), H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL,
                       impl_->transfer_plist.get(), values.data()),
               "cannot read " + context);
  return values;
}

bool CheckpointReader::has_attribute(const std::string& key) const {
  const htri_t exists = H5Aexists(impl_->file.get(), key.c_str());
  if (exists < 0) {
    throw_hdf5_failure("cannot look up attribute '" + key + "' of checkpoint '" + impl_->path + "'");
  }
  return exists > 0;
}

std::string CheckpointReader::string_attribute(const std::string& key) const {
  const std::string context = "attribute '" + key + "' of checkpoint '" + impl_->path + "'";
  Hdf5Handle attribute = impl_->open_attribute(key);
  const H5T_class_t type_class = Impl::attribute_class(attribute.get(), "cannot read " + context);
  if (type_class != H5T_STRING) {
    throw std::runtime_error(context + " is " + describe_class(type_class) + ", not a string");
  }
  Hdf5Handle file_type = checked_handle(H5Aget_type(attribute.get()), H5Tclose,
                                        "cannot read " + context);
  const htri_t variable_length = H5Tis_variable_str(file_type.get());
  if (variable_length < 0) throw_hdf5_failure("cannot read " + context);
  if (variable_length > 0) {
    // Written by other tools (h5py stores str as variable-length): HDF5 allocates the copy.
    Hdf5Handle memory_type = checked_handle(H5Tcopy(H5T_C_S1), H5Tclose, "cannot read " + context);
    check_status(H5Tset_size(memory_type.get(), H5T_VARIABLE), "cannot read " + context);
    char* text = nullptr;
    check_status(H5Aread(attribute.get(), memory_type.get(), &text), "cannot read " + context);
    const std::string value = text != nullptr ? text : "";
    H5free_memory(text);
    return value;
  }
  std::string value(H5Tget_size(file_type.get()), '\0');
  check_status(H5Aread(attribute.get(), file_type.get(), value.data()), "cannot read " + context);
  value.resize(std::strlen(value.c_str()));  // fixed-length strings are NUL-padded
  return value;
}

int64_t CheckpointReader::int_attribute(const std::string& key) const {
  const std::string context = "attribute '" + key + "' of checkpoint '" + impl_->path + "'";
  Hdf5Handle attribute = impl_->open_attribute(key);
  const H5T_class_t type_class = Impl::attribute_class(attribute.get(), "cannot read " + context);
  if (type_class != H5T_INTEGER) {
    throw std::runtime_error(context + " is " + describe_class(type_class) + ", not an integer");
  }
  int64_t value = 0;
  check_status(H5Aread(attribute.get(), H5T_NATIVE_INT64, &value), "cannot read " + context);
  return value;
}

}  // namespace freqkv
