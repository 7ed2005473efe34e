// TensorBoard event files (see trainer/tensorboard.h). Reading order: record
// framing, the writer, a run directory's files.
#include "trainer/tensorboard.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iterator>

#include <isa-l/crc.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "io/atomic_file.h"
#include "trainer/tensorboard.pb.h"

namespace sparseflash::trainer {

namespace fs = std::filesystem;
namespace tb = sparseflash::tensorboard;

namespace {

constexpr char kFilePrefix[] = "events.out.tfevents.";
constexpr char kFileVersion[] = "brain.Event:2";
constexpr char kTextPlugin[] = "text";

double unix_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

void put_le(std::string* out, uint64_t value, int bytes) {
  for (int i = 0; i < bytes; ++i) out->push_back(static_cast<char>((value >> (8 * i)) & 0xff));
}

uint64_t get_le(const char* p, int bytes) {
  uint64_t value = 0;
  for (int i = 0; i < bytes; ++i) value |= uint64_t{static_cast<unsigned char>(p[i])} << (8 * i);
  return value;
}

}  // namespace

// ---------------------------------------------------------------------------
// record framing

uint32_t masked_crc32c(std::string_view data) {
  // crc32_iscsi neither inverts its start value nor its result: CRC-32C
  // proper starts from and ends with ~. It does not write to the buffer.
  const uint32_t crc =
      ~crc32_iscsi(reinterpret_cast<unsigned char*>(const_cast<char*>(data.data())),
                   static_cast<int>(data.size()), 0xffffffffu);
  return ((crc >> 15) | (crc << 17)) + 0xa282ead8u;
}

std::string frame_record(std::string_view data) {
  std::string out;
  out.reserve(data.size() + 16);
  put_le(&out, data.size(), 8);
  put_le(&out, masked_crc32c(out), 4);
  out.append(data);
  put_le(&out, masked_crc32c(data), 4);
  return out;
}

absl::StatusOr<std::vector<std::string>> read_records(const std::string& path, bool* torn_tail) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::ErrnoToStatus(errno, absl::StrCat("cannot open event file ", path));
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) return absl::DataLossError(absl::StrCat("cannot read event file ", path));
  std::vector<std::string> records;
  if (torn_tail) *torn_tail = false;
  size_t at = 0;
  while (at < bytes.size()) {
    const auto corrupt = [&](const char* what) {
      return absl::DataLossError(absl::StrCat("event file ", path, " is corrupt: ", what,
                                              " of the record at byte ", at,
                                              " does not match its CRC"));
    };
    if (bytes.size() - at < 12) break;  // torn
    const std::string_view header(bytes.data() + at, 8);
    if (get_le(bytes.data() + at + 8, 4) != masked_crc32c(header)) return corrupt("the length");
    const uint64_t length = get_le(bytes.data() + at, 8);
    if (bytes.size() - at < 16 || length > bytes.size() - at - 16) break;  // torn
    const std::string_view data(bytes.data() + at + 12, length);
    if (get_le(bytes.data() + at + 12 + length, 4) != masked_crc32c(data))
      return corrupt("the data");
    records.emplace_back(data);
    at += 12 + length + 4;
  }
  if (torn_tail) *torn_tail = at < bytes.size();
  return records;
}

// ---------------------------------------------------------------------------
// writing

namespace {

// The Unix time in an event file's name, or -1 when it has none.
int64_t file_time(const std::string& name) {
  if (name.rfind(kFilePrefix, 0) != 0) return -1;
  const std::string rest = name.substr(sizeof(kFilePrefix) - 1);
  int64_t t = -1;
  if (!absl::SimpleAtoi(rest.substr(0, rest.find('.')), &t)) return -1;
  return t;
}

// The event files in `dir`, in the order readers take them (by name).
std::vector<std::string> event_files(const std::string& dir) {
  std::vector<std::string> paths;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec))
    if (entry.is_regular_file(ec) && file_time(entry.path().filename().string()) >= 0)
      paths.push_back(entry.path().string());
  std::sort(paths.begin(), paths.end());
  return paths;
}

std::string host_name() {
  char name[256] = {};
  if (gethostname(name, sizeof(name) - 1) != 0 || name[0] == 0) return "localhost";
  return name;
}

}  // namespace

absl::StatusOr<std::unique_ptr<EventWriter>> EventWriter::create(const std::string& dir) {
  const double now = unix_seconds();
  // Readers take a directory's files in name order: a start in the same
  // second as the previous one (a quick resume) still comes after it.
  int64_t time = static_cast<int64_t>(now);
  for (const std::string& path : event_files(dir))
    time = std::max(time, file_time(fs::path(path).filename().string()) + 1);
  const std::string path =
      (fs::path(dir) / absl::StrCat(kFilePrefix, time, ".", host_name())).string();
  std::FILE* file = std::fopen(path.c_str(), "wbx");  // x: never another run's file
  if (!file) return absl::ErrnoToStatus(errno, absl::StrCat("cannot create event file ", path));
  std::unique_ptr<EventWriter> writer(new EventWriter(path, file));
  tb::Event event;
  event.set_wall_time(now);
  event.set_file_version(kFileVersion);
  if (auto s = writer->write(event.SerializeAsString()); !s.ok()) return s;
  return writer;
}

EventWriter::~EventWriter() { std::fclose(file_); }

absl::Status EventWriter::write(const std::string& serialized_event) {
  const std::string record = frame_record(serialized_event);
  if (std::fwrite(record.data(), 1, record.size(), file_) != record.size() ||
      std::fflush(file_) != 0)
    return absl::ErrnoToStatus(errno, absl::StrCat("cannot write event file ", path_));
  return absl::OkStatus();
}

absl::Status EventWriter::add_scalars(int64_t step,
                                      const std::vector<std::pair<std::string, double>>& scalars) {
  tb::Event event;
  event.set_wall_time(unix_seconds());
  event.set_step(step);
  for (const auto& [tag, value] : scalars) {
    tb::Summary::Value* v = event.mutable_summary()->add_value();
    v->set_tag(tag);
    v->set_simple_value(static_cast<float>(value));
  }
  return write(event.SerializeAsString());
}

absl::Status EventWriter::add_text(int64_t step, const std::string& tag,
                                   const std::string& markdown) {
  // As TensorBoard's own text summaries: plugin "text" with empty options
  // (its defaults), a scalar string tensor.
  tb::Event event;
  event.set_wall_time(unix_seconds());
  event.set_step(step);
  tb::Summary::Value* v = event.mutable_summary()->add_value();
  v->set_tag(tag);
  v->mutable_metadata()->mutable_plugin_data()->set_plugin_name(kTextPlugin);
  v->mutable_metadata()->set_data_class(tb::DATA_CLASS_TENSOR);
  tb::TensorProto* tensor = v->mutable_tensor();
  tensor->set_dtype(tb::DT_STRING);
  tensor->mutable_tensor_shape();  // no dimensions: a scalar
  tensor->add_string_val(markdown);
  return write(event.SerializeAsString());
}

absl::Status EventWriter::add_restart(int64_t step) {
  tb::Event event;
  event.set_wall_time(unix_seconds());
  event.set_step(step);
  event.mutable_session_log()->set_status(tb::SessionLog::START);
  return write(event.SerializeAsString());
}

// ---------------------------------------------------------------------------
// a run's event files

namespace {

bool is_text(const tb::Event& event) {
  for (const auto& v : event.summary().value())
    if (v.metadata().plugin_data().plugin_name() == kTextPlugin) return true;
  return false;
}

// Keeps the events of `path` that a run resumed at `resume_step` does not
// write again (tensorboard.h); rewrites the file only when some go.
absl::Status cut_event_file(const std::string& path, int64_t resume_step) {
  bool torn = false;
  auto records = read_records(path, &torn);
  if (!records.ok())
    return absl::Status(
        records.status().code(),
        absl::StrCat(records.status().message(), " (delete it to resume without its events)"));
  std::string kept;
  bool dropped = torn;
  for (size_t i = 0; i < records->size(); ++i) {
    tb::Event event;
    if (!event.ParseFromString((*records)[i]))
      return absl::DataLossError(absl::StrCat("event file ", path, ": record ", i,
                                              " is not an Event (delete the file to resume "
                                              "without its events)"));
    const bool keep =
        event.step() < resume_step || (event.step() == resume_step && !is_text(event));
    if (keep) kept += frame_record((*records)[i]);
    dropped |= !keep;
  }
  if (!dropped) return absl::OkStatus();
  // Not "<path>.tmp.PID": readers take every name with "tfevents" in it.
  return io::write_file_atomically(path, kept,
                                   (fs::path(path).parent_path() / ".events_cut.tmp").string());
}

}  // namespace

absl::StatusOr<std::unique_ptr<EventWriter>> open_run_events(const std::string& dir,
                                                             int64_t resume_step) {
  for (const std::string& path : event_files(dir)) {
    if (resume_step < 0) {
      if (std::remove(path.c_str()) != 0)
        return absl::ErrnoToStatus(
            errno, absl::StrCat("cannot remove the previous run's event file ", path));
    } else if (auto s = cut_event_file(path, resume_step); !s.ok()) {
      return s;
    }
  }
  auto writer = EventWriter::create(dir);
  if (!writer.ok()) return writer.status();
  if (resume_step >= 0)
    if (auto s = (*writer)->add_restart(resume_step + 1); !s.ok()) return s;
  return writer;
}

}  // namespace sparseflash::trainer
