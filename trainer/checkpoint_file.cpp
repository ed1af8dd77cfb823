// CheckpointWriter / CheckpointReader over the HDF5 C API. Every HDF5 identifier lives in an
// Hdf5Handle, and every failing HDF5 call becomes a std::runtime_error carrying the file, the
// tensor and HDF5's own explanation (its automatic error printing is switched off).
//
// What changes for the collective MPI-IO version (all ranks writing one file):
// make_file_access_plist (H5Pset_fapl_mpio), make_transfer_plist (H5Pset_dxpl_mpio collective),
// the rows each rank passes to write_rows, and commit()'s check that every row was written, which
// must then combine the ranks' RowCoverage (each rank only sees its own slabs). The rest is
// already collective-safe: every rank makes the same metadata calls in the same order, a rank with
// no rows still calls H5Dwrite with an empty selection, and datasets are contiguous, no fill pass.
#include "trainer/checkpoint_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <hdf5.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <iterator>
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

  // Closes now and returns HDF5's status: for a file, a failed close means data never reached it.
  herr_t close() {
    if (id_ < 0) return 0;
    return closer_(std::exchange(id_, H5I_INVALID_HID));
  }
  void reset() { close(); }

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

// The file-access property list: the serial default driver. The collective version selects
// MPI-IO here (H5Pset_fapl_mpio with the communicator) and nothing else about the file changes.
Hdf5Handle make_file_access_plist(const std::string& path) {
  Hdf5Handle plist = checked_handle(H5Pcreate(H5P_FILE_ACCESS), H5Pclose,
                                    "cannot create the file-access property list for '" + path + "'");
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

// The dataset-transfer property list for H5Dwrite/H5Dread: defaults in the serial version; the
// collective version asks for H5FD_MPIO_COLLECTIVE here.
Hdf5Handle make_transfer_plist(const std::string& path) {
  return checked_handle(H5Pcreate(H5P_DATASET_XFER), H5Pclose,
                        "cannot create the transfer property list for '" + path + "'");
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

// Rows along dim 0 and elements per row; a 1-D tensor's rows are its elements and a scalar is
// one row of one element.
struct RowGeometry {
  int64_t rows = 1;
  int64_t row_elements = 1;
};

RowGeometry row_geometry(const std::vector<int64_t>& shape) {
  RowGeometry geometry;
  if (shape.empty()) return geometry;
  geometry.rows = shape[0];
  geometry.row_elements = 1;
  for (size_t i = 1; i < shape.size(); ++i) geometry.row_elements *= shape[i];
  return geometry;
}

// The file and memory dataspaces selecting rows [row_offset, row_offset + n_rows) of a dataset
// of the given shape. An empty range selects nothing in both, so that the (collective) transfer
// call is still made by a rank without rows.
struct RowSelection {
  Hdf5Handle file_space;
  Hdf5Handle memory_space;
};

RowSelection select_rows(hid_t dataset, const std::vector<int64_t>& shape, int64_t row_offset,
                         int64_t n_rows, const std::string& context) {
  RowSelection selection;
  selection.file_space = checked_handle(H5Dget_space(dataset), H5Sclose,
                                        context + ": cannot get the dataspace");
  const RowGeometry geometry = row_geometry(shape);
  const int64_t elements = n_rows * geometry.row_elements;
  if (elements == 0) {
    selection.memory_space = checked_handle(H5Screate(H5S_SCALAR), H5Sclose,
                                            context + ": cannot create the memory dataspace");
    check_status(H5Sselect_none(selection.file_space.get()), context + ": cannot select nothing");
    check_status(H5Sselect_none(selection.memory_space.get()), context + ": cannot select nothing");
    return selection;
  }
  if (!shape.empty()) {
    std::vector<hsize_t> start(shape.size(), 0);
    std::vector<hsize_t> count(shape.begin(), shape.end());
    start[0] = static_cast<hsize_t>(row_offset);
    count[0] = static_cast<hsize_t>(n_rows);
    check_status(H5Sselect_hyperslab(selection.file_space.get(), H5S_SELECT_SET, start.data(),
                                     nullptr, count.data(), nullptr),
                 context + ": cannot select the rows");
  }
  const hsize_t memory_elements = static_cast<hsize_t>(elements);
  selection.memory_space = checked_handle(H5Screate_simple(1, &memory_elements, nullptr), H5Sclose,
                                          context + ": cannot create the memory dataspace");
  return selection;
}

void check_row_range(const std::vector<int64_t>& shape, int64_t row_offset, int64_t n_rows,
                     const void* data, const std::string& context) {
  if (shape.empty()) {
    throw std::runtime_error(context + ": the tensor is a scalar (shape []), it has no rows; "
                             "use write_tensor/read_tensor");
  }
  const int64_t rows = shape[0];
  if (row_offset < 0 || n_rows < 0 || row_offset > rows || n_rows > rows - row_offset) {
    throw std::runtime_error(context + ": " + std::to_string(n_rows) + " rows at row offset " +
                             std::to_string(row_offset) + " are not within its " +
                             std::to_string(rows) + " rows");
  }
  if (data == nullptr && n_rows * row_geometry(shape).row_elements > 0) {
    throw std::runtime_error(context + ": null data pointer");
  }
}

// Row intervals [begin, end) written so far, kept merged, for commit()'s completeness check.
class RowCoverage {
 public:
  void add(int64_t begin, int64_t end) {
    if (begin >= end) return;
    auto next = intervals_.upper_bound(begin);
    if (next != intervals_.begin()) {
      auto previous = std::prev(next);
      if (previous->second >= begin) {
        begin = previous->first;
        end = std::max(end, previous->second);
        intervals_.erase(previous);
      }
    }
    while (next != intervals_.end() && next->first <= end) {
      end = std::max(end, next->second);
      next = intervals_.erase(next);
    }
    intervals_.emplace(begin, end);
  }

  // The intervals of [0, rows) never added.
  std::vector<std::pair<int64_t, int64_t>> gaps(int64_t rows) const {
    std::vector<std::pair<int64_t, int64_t>> missing;
    int64_t covered_until = 0;
    for (const auto& [begin, end] : intervals_) {
      if (begin > covered_until) missing.emplace_back(covered_until, begin);
      covered_until = std::max(covered_until, end);
    }
    if (covered_until < rows) missing.emplace_back(covered_until, rows);
    return missing;
  }

 private:
  std::map<int64_t, int64_t> intervals_;
};

// A root attribute, replacing an existing one of that name.
void write_root_attribute(hid_t file, const std::string& key, hid_t file_type, hid_t memory_type,
                          const void* value, const std::string& path) {
  const std::string context = "cannot write attribute '" + key + "' of checkpoint '" + path + "'";
  const htri_t exists = H5Aexists(file, key.c_str());
  if (exists < 0) throw_hdf5_failure(context);
  if (exists > 0) check_status(H5Adelete(file, key.c_str()), context + ": cannot replace it");
  Hdf5Handle space = checked_handle(H5Screate(H5S_SCALAR), H5Sclose, context);
  Hdf5Handle attribute = checked_handle(
      H5Acreate2(file, key.c_str(), file_type, space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose,
      context);
  check_status(H5Awrite(attribute.get(), memory_type, value), context);
}

void write_string_attribute(hid_t file, const std::string& key, const std::string& value,
                            const std::string& path) {
  const std::string context = "cannot write attribute '" + key + "' of checkpoint '" + path + "'";
  // Fixed-length UTF-8, NUL-padded; HDF5 has no zero-length fixed strings, so "" is one NUL.
  Hdf5Handle type = checked_handle(H5Tcopy(H5T_C_S1), H5Tclose, context);
  const std::string stored = value.empty() ? std::string(1, '\0') : value;
  check_status(H5Tset_size(type.get(), stored.size()), context);
  check_status(H5Tset_strpad(type.get(), H5T_STR_NULLPAD), context);
  check_status(H5Tset_cset(type.get(), H5T_CSET_UTF8), context);
  write_root_attribute(file, key, type.get(), type.get(), stored.data(), path);
}

void write_int_attribute(hid_t file, const std::string& key, int64_t value, const std::string& path) {
  write_root_attribute(file, key, H5T_STD_I64LE, H5T_NATIVE_INT64, &value, path);
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

}  // namespace

// ---- CheckpointWriter ---------------------------------------------------------------------------

struct CheckpointWriter::Impl {
  struct Tensor {
    std::vector<int64_t> shape;
    int64_t element_count = 0;
    Hdf5Handle dataset;
    RowCoverage written_rows;
  };

  std::string final_path;
  std::string tmp_path;
  Hdf5Handle transfer_plist;
  Hdf5Handle file;
  std::map<std::string, Tensor> tensors;
  // open: accepting tensors and attributes; failed_commit: commit() threw after it started
  // changing the file, which is then only fit for removal; committed: renamed onto final_path.
  enum class State { open, failed_commit, committed } state = State::open;
  bool tmp_file_created = false;

  // An uncommitted writer takes its tmp file with it: nothing half-written stays behind.
  ~Impl() {
    if (!tmp_file_created || state == State::committed) return;
    tensors.clear();
    file.reset();
    ::unlink(tmp_path.c_str());
  }

  std::string tensor_context(const std::string& name) const {
    return "checkpoint '" + final_path + "', tensor '" + name + "'";
  }

  void check_open(const char* operation) const {
    if (state == State::open) return;
    throw std::runtime_error(std::string("cannot ") + operation + " checkpoint '" + final_path +
                             (state == State::committed ? "': it is already committed"
                                                        : "': an earlier commit() failed"));
  }

  Tensor& tensor(const std::string& name) {
    auto found = tensors.find(name);
    if (found == tensors.end()) {
      throw std::runtime_error(tensor_context(name) +
                               ": no such tensor in this writer (create_tensor it first)");
    }
    return found->second;
  }

  void write_selected_rows(const std::string& name, Tensor& tensor, int64_t row_offset,
                           int64_t n_rows, const float* data) {
    const std::string context = tensor_context(name) + " of shape " + format_shape(tensor.shape);
    if (tensor.shape.empty()) {
      // A scalar: the whole (single-element) dataspace.
      check_status(H5Dwrite(tensor.dataset.get(), H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL,
                            transfer_plist.get(), data),
                   "cannot write " + context);
      tensor.written_rows.add(0, 1);
      return;
    }
    RowSelection selection = select_rows(tensor.dataset.get(), tensor.shape, row_offset, n_rows,
                                         context);
    check_status(H5Dwrite(tensor.dataset.get(), H5T_NATIVE_FLOAT, selection.memory_space.get(),
                          selection.file_space.get(), transfer_plist.get(), data),
                 "cannot write rows [" + std::to_string(row_offset) + ", " +
                     std::to_string(row_offset + n_rows) + ") of " + context);
    tensor.written_rows.add(row_offset, row_offset + n_rows);
  }
};

CheckpointWriter::CheckpointWriter(const std::string& final_path) : impl_(std::make_unique<Impl>()) {
  silence_hdf5_error_printing();
  if (final_path.empty() || final_path.back() == '/') {
    throw std::runtime_error("invalid checkpoint path '" + final_path + "': it must name a file");
  }
  impl_->final_path = final_path;
  impl_->tmp_path = final_path + ".tmp";

  const fs::path parent = fs::path(final_path).parent_path();
  if (!parent.empty()) {
    std::error_code error;
    fs::create_directories(parent, error);
    if (error) {
      throw std::runtime_error("cannot create directory '" + parent.string() +
                               "' for checkpoint '" + final_path + "': " + error.message());
    }
  }
  Hdf5Handle access_plist = make_file_access_plist(impl_->tmp_path);
  impl_->file = checked_handle(
      H5Fcreate(impl_->tmp_path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, access_plist.get()), H5Fclose,
      "cannot create '" + impl_->tmp_path + "' to write checkpoint '" + final_path + "'");
  impl_->tmp_file_created = true;
  impl_->transfer_plist = make_transfer_plist(impl_->tmp_path);
}

CheckpointWriter::~CheckpointWriter() = default;
CheckpointWriter::CheckpointWriter(CheckpointWriter&&) noexcept = default;
CheckpointWriter& CheckpointWriter::operator=(CheckpointWriter&&) noexcept = default;

const std::string& CheckpointWriter::final_path() const { return impl_->final_path; }
const std::string& CheckpointWriter::tmp_path() const { return impl_->tmp_path; }

void CheckpointWriter::create_tensor(const std::string& name, const std::vector<int64_t>& shape) {
  impl_->check_open("add a tensor to");
  const std::string context = impl_->tensor_context(name);
  split_name(name, "tensor", impl_->final_path);
  const int64_t elements = element_count(shape, context);
  if (impl_->tensors.count(name)) {
    throw std::runtime_error(context + ": created twice");
  }
  // A name cannot be both a tensor and a group: report it here rather than as an HDF5 failure.
  for (size_t slash = name.find('/'); slash != std::string::npos; slash = name.find('/', slash + 1)) {
    const std::string prefix = name.substr(0, slash);
    if (impl_->tensors.count(prefix)) {
      throw std::runtime_error(context + ": '" + prefix + "' is already a tensor, not a group");
    }
  }
  const auto below = impl_->tensors.lower_bound(name + "/");
  if (below != impl_->tensors.end() && below->first.compare(0, name.size() + 1, name + "/") == 0) {
    throw std::runtime_error(context + ": already a group (holding '" + below->first + "')");
  }

  std::vector<hsize_t> dims(shape.begin(), shape.end());
  Hdf5Handle space = checked_handle(
      shape.empty() ? H5Screate(H5S_SCALAR)
                    : H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr),
      H5Sclose, context + ": cannot create the dataspace for shape " + format_shape(shape));
  Hdf5Handle link_plist = checked_handle(H5Pcreate(H5P_LINK_CREATE), H5Pclose, context);
  check_status(H5Pset_create_intermediate_group(link_plist.get(), 1), context);
  Hdf5Handle create_plist = checked_handle(H5Pcreate(H5P_DATASET_CREATE), H5Pclose, context);
  // Contiguous storage is what parallel HDF5 writes collectively without chunk bookkeeping, and
  // since commit() insists every row is written, a fill pass would only double the I/O.
  check_status(H5Pset_layout(create_plist.get(), H5D_CONTIGUOUS), context);
  check_status(H5Pset_fill_time(create_plist.get(), H5D_FILL_TIME_NEVER), context);

  Impl::Tensor tensor;
  tensor.shape = shape;
  tensor.element_count = elements;
  tensor.dataset = checked_handle(H5Dcreate2(impl_->file.get(), name.c_str(), H5T_IEEE_F32LE,
                                             space.get(), link_plist.get(), create_plist.get(),
                                             H5P_DEFAULT),
                                  H5Dclose,
                                  "cannot create " + context + " of shape " + format_shape(shape));
  impl_->tensors.emplace(name, std::move(tensor));
}

void CheckpointWriter::write_rows(const std::string& name, int64_t row_offset, int64_t n_rows,
                                  const float* data) {
  impl_->check_open("write to");
  Impl::Tensor& tensor = impl_->tensor(name);
  check_row_range(tensor.shape, row_offset, n_rows, data,
                  impl_->tensor_context(name) + " of shape " + format_shape(tensor.shape));
  impl_->write_selected_rows(name, tensor, row_offset, n_rows, data);
}

void CheckpointWriter::write_tensor(const std::string& name, const std::vector<int64_t>& shape,
                                    const float* data) {
  create_tensor(name, shape);
  Impl::Tensor& tensor = impl_->tensor(name);
  if (data == nullptr && tensor.element_count > 0) {
    throw std::runtime_error(impl_->tensor_context(name) + ": null data pointer");
  }
  impl_->write_selected_rows(name, tensor, 0, row_geometry(shape).rows, data);
}

void CheckpointWriter::set_attribute(const std::string& key, const std::string& value) {
  impl_->check_open("set an attribute of");
  if (key.empty() || key == kFormatKey || key == kFormatVersionKey || key == kCompleteKey) {
    throw std::runtime_error("checkpoint '" + impl_->final_path + "': attribute key '" + key +
                             "' is empty or reserved for the file format");
  }
  if (value.find('\0') != std::string::npos) {
    throw std::runtime_error("checkpoint '" + impl_->final_path + "': the value of attribute '" +
                             key + "' contains a NUL byte");
  }
  write_string_attribute(impl_->file.get(), key, value, impl_->final_path);
}

void CheckpointWriter::set_attribute(const std::string& key, int64_t value) {
  impl_->check_open("set an attribute of");
  if (key.empty() || key == kFormatKey || key == kFormatVersionKey || key == kCompleteKey) {
    throw std::runtime_error("checkpoint '" + impl_->final_path + "': attribute key '" + key +
                             "' is empty or reserved for the file format");
  }
  write_int_attribute(impl_->file.get(), key, value, impl_->final_path);
}

void CheckpointWriter::commit() {
  impl_->check_open("commit");
  Impl& impl = *impl_;
  const std::string context = "cannot commit checkpoint '" + impl.final_path + "'";

  // A forgotten slab would otherwise resume silently as whatever bytes the disk held.
  for (const auto& [name, tensor] : impl.tensors) {
    if (tensor.element_count == 0) continue;
    const auto gaps = tensor.written_rows.gaps(row_geometry(tensor.shape).rows);
    if (gaps.empty()) continue;
    std::string listed;
    for (size_t i = 0; i < gaps.size() && i < 4; ++i) {
      listed += (i ? ", [" : "[") + std::to_string(gaps[i].first) + ", " +
                std::to_string(gaps[i].second) + ")";
    }
    if (gaps.size() > 4) listed += ", ...";
    throw std::runtime_error(context + ": tensor '" + name + "' of shape " +
                             format_shape(tensor.shape) + " has rows never written: " + listed);
  }

  // From here on a failure leaves the file half-finalised: the writer only removes it.
  impl.state = Impl::State::failed_commit;
  write_string_attribute(impl.file.get(), kFormatKey, kCheckpointFormat, impl.final_path);
  write_int_attribute(impl.file.get(), kFormatVersionKey, kCheckpointFormatVersion, impl.final_path);
  impl.tensors.clear();  // closes the datasets: the file must have no open objects to close
  // The rename below is what publishes the file atomically; the marker, written last, lets a
  // reader refuse files that never went through a finished commit (e.g. a tmp copied by hand).
  write_int_attribute(impl.file.get(), kCompleteKey, 1, impl.final_path);
  check_status(H5Fflush(impl.file.get(), H5F_SCOPE_GLOBAL), context + ": flush failed");
  check_status(impl.file.close(), context + ": closing '" + impl.tmp_path + "' failed");

  fsync_path(impl.tmp_path, false, context);
  if (std::rename(impl.tmp_path.c_str(), impl.final_path.c_str()) != 0) {
    throw std::runtime_error(context + ": cannot rename '" + impl.tmp_path + "' to '" +
                             impl.final_path + "': " + std::strerror(errno));
  }
  impl.state = Impl::State::committed;  // the tmp file is gone: nothing for the destructor to remove
  const fs::path parent = fs::path(impl.final_path).parent_path();
  fsync_path(parent.empty() ? "." : parent.string(), true, context);
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
  Hdf5Handle access_plist = make_file_access_plist(path);
  const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDONLY, access_plist.get());
  if (file < 0) {
    throw std::runtime_error(quoted + " is truncated or corrupt: HDF5 cannot open it (" +
                             hdf5_error_detail() + ")");
  }
  impl->file = Hdf5Handle(file, H5Fclose);
  impl->transfer_plist = make_transfer_plist(path);
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

void CheckpointReader::read_rows(const std::string& name, int64_t row_offset, int64_t n_rows,
                                 float* out) const {
  Hdf5Handle dataset = impl_->open_tensor(name);
  const std::vector<int64_t> shape = impl_->dataset_shape(dataset.get(), name);
  const std::string context = impl_->tensor_context(name) + " of shape " + format_shape(shape);
  check_row_range(shape, row_offset, n_rows, out, context);
  RowSelection selection = select_rows(dataset.get(), shape, row_offset, n_rows, context);
  check_status(H5Dread(dataset.get(), H5T_NATIVE_FLOAT, selection.memory_space.get(),
                       selection.file_space.get(), impl_->transfer_plist.get(), out),
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
