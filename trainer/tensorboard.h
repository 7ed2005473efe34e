// TensorBoard event files: what `train` logs to metrics.jsonl, also as
// scalars TensorBoard plots, plus the resolved config as text.
//
// An event file is a sequence of records, each a serialized Event
// (trainer/tensorboard.proto) framed as TFRecord frames it:
//   uint64 length, uint32 masked CRC-32C of those 8 bytes, data,
//   uint32 masked CRC-32C of the data            (all little-endian)
// named events.out.tfevents.<unix time>.<host>, first record "brain.Event:2".
//
// A run directory gets one file per process start; readers merge them in name
// order. A resumed run first cuts what its checkpoint does not cover out of
// the older files, as it does to metrics.jsonl (see open_run_events).
#pragma once

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace sparseflash::trainer {

// ---------------------------------------------------------------------------
// record framing

// CRC-32C (Castagnoli) of `data`, as ISA-L's crc32_iscsi computes it, masked
// the TFRecord way: rotated right by 15 bits, plus 0xa282ead8.
uint32_t masked_crc32c(std::string_view data);

// One framed record holding `data`.
std::string frame_record(std::string_view data);

// The records of the event file at `path`, in order. A record cut short at
// the end (a writer killed mid-record) ends the file, with *torn_tail set;
// a CRC that does not match is a DataLoss error naming the file and offset.
absl::StatusOr<std::vector<std::string>> read_records(const std::string& path,
                                                      bool* torn_tail = nullptr);

// ---------------------------------------------------------------------------
// writing

// Appends events to one new event file, flushed after each, so that a killed
// run keeps all it logged.
class EventWriter {
 public:
  // Creates `dir`/events.out.tfevents.<time>.<host>, with <time> after that of
  // every event file already there (so that readers take it last), and writes
  // its file_version record.
  static absl::StatusOr<std::unique_ptr<EventWriter>> create(const std::string& dir);
  ~EventWriter();
  EventWriter(const EventWriter&) = delete;
  EventWriter& operator=(const EventWriter&) = delete;

  // One event holding the scalars (tag, value), stored as float32 as
  // TensorBoard stores every scalar.
  absl::Status add_scalars(int64_t step,
                           const std::vector<std::pair<std::string, double>>& scalars);
  // A text summary (TensorBoard's text dashboard renders it as Markdown).
  absl::Status add_text(int64_t step, const std::string& tag, const std::string& markdown);
  // A SessionLog START record at `step`: TensorBoard drops what it holds of
  // steps >= `step`, which this process logs anew.
  absl::Status add_restart(int64_t step);

  const std::string& path() const { return path_; }

 private:
  EventWriter(std::string path, std::FILE* file) : path_(std::move(path)), file_(file) {}
  absl::Status write(const std::string& serialized_event);

  std::string path_;
  std::FILE* file_;
};

// ---------------------------------------------------------------------------
// a run's event files

// Prepares `dir` for a run that continues after `resume_step` (-1: starts
// from scratch) and opens its new event file.
//
// Steps are never duplicated. A run killed after logging step k but resumed
// from its checkpoint at step j < k logs steps j+1..k again, with other
// timings. So, as metrics.jsonl keeps only its records of steps <= j, the
// older event files keep only their events of steps <= j (rewritten
// atomically, only when something goes), and a fresh start removes them. A
// TensorBoard that read the dropped events while the run was alive forgets
// them at the START record written at step j+1 into the new file.
//
// Each start also writes the config as text at its first step (0 or j), so a
// text summary of step j in the older files is dropped as well.
//
// Errors name the file: an unreadable or corrupt older event file (delete it
// to go on), or a new one that cannot be created.
absl::StatusOr<std::unique_ptr<EventWriter>> open_run_events(const std::string& dir,
                                                             int64_t resume_step);

}  // namespace sparseflash::trainer
