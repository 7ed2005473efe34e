// `sparseflash prepare`: walks text inputs, tokenizes every document and
// writes train/validation token shards plus meta.json, all or nothing.
#include "data/prepare.h"

#include <dirent.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <deque>
#include <filesystem>
#include <map>
#include <optional>
#include <regex>
#include <stdexcept>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "data/files.h"
#include "data/shard.h"
#include "io/atomic_file.h"
#include "io/errors.h"

#ifdef SPARSEFLASH_WITH_LIBARCHIVE
#include <archive.h>
#include <archive_entry.h>
#endif

namespace sparseflash::data {

namespace {

using files::ends_with;
using files::errno_error;
using files::is_archive_name;
using files::join_path;
using files::make_dirs;
using files::read_file;
using files::strip_dot_slash;

// --- Document checks ----------------------------------------------------------

// True when `s` is well-formed UTF-8 without NUL bytes: text as opposed to a
// binary. Overlong forms, surrogates and code points past U+10FFFF are invalid.
bool is_text(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char c = p[i];
    if (c < 0x80) {
      if (c == 0) return false;
      ++i;
      continue;
    }
    int len;
    uint32_t cp;
    if (c >= 0xc2 && c <= 0xdf) {
      len = 2;
      cp = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
      len = 3;
      cp = c & 0x0f;
    } else if (c >= 0xf0 && c <= 0xf4) {
      len = 4;
      cp = c & 0x07;
    } else {
      return false;  // continuation byte, 0xc0/0xc1 (overlong) or > 0xf4
    }
    if (i + len > n) return false;
    for (int k = 1; k < len; ++k) {
      if ((p[i + k] & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (p[i + k] & 0x3f);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) || cp > 0x10ffff ||
        (cp >= 0xd800 && cp <= 0xdfff)) {
      return false;
    }
    i += len;
  }
  return true;
}

// Position of a document in [0, 10^6): below val_fraction * 10^6 means val.
uint64_t split_key(const std::string& path) { return fnv1a64(path.data(), path.size()) % 1000000; }

// "a/b/c.txt" -> "a/b"; "c.txt" -> "" (the directory a --join-dir document is named by).
std::string parent_path(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? std::string() : path.substr(0, slash);
}

// Path order with '/' before every other byte: a directory's subtree sorts before its
// next sibling ("a/x" < "a-b"), which is the order walk_dir visits directories in.
struct PathOrder {
  bool operator()(const std::string& a, const std::string& b) const {
    const size_t n = std::min(a.size(), b.size());
    for (size_t i = 0; i < n; ++i) {
      const int ca = a[i] == '/' ? -1 : static_cast<unsigned char>(a[i]);
      const int cb = b[i] == '/' ? -1 : static_cast<unsigned char>(b[i]);
      if (ca != cb) return ca < cb;
    }
    return a.size() < b.size();
  }
};

// --- Shard stream of one split ------------------------------------------------

// Accumulates the documents of one split and writes full shards under
// temporary names as it goes; commit() later renames them into place.
class SplitWriter {
 public:
  SplitWriter(std::string split, std::string out_dir, std::string temp_prefix,
              uint64_t shard_tokens, int vocab_size)
      : split_(std::move(split)),
        out_dir_(std::move(out_dir)),
        temp_prefix_(std::move(temp_prefix)),
        shard_tokens_(shard_tokens),
        vocab_size_(vocab_size),
        counts_(static_cast<size_t>(vocab_size), 0) {}

  // `tokens` already ends with the end-of-document token.
  absl::Status add(const std::vector<int32_t>& tokens, uint64_t text_bytes) {
    for (int32_t t : tokens) ++counts_[static_cast<size_t>(t)];
    tokens_ += tokens.size();
    bytes_ += text_bytes;
    ++documents_;
    doc_ends_.push_back(tokens_);  // stream position just past this document
    // Documents may straddle shards: fill the buffer up to shard_tokens, write
    // it and go on. Filling exactly (rather than cutting a larger buffer)
    // avoids copying shard-sized chunks.
    size_t pos = 0;
    while (pos < tokens.size()) {
      const size_t take = static_cast<size_t>(
          std::min<uint64_t>(tokens.size() - pos, shard_tokens_ - buffer_.size()));
      buffer_.insert(buffer_.end(), tokens.begin() + pos, tokens.begin() + pos + take);
      pos += take;
      if (buffer_.size() == shard_tokens_) {
        absl::Status status = write();
        if (!status.ok()) return status;
      }
    }
    return absl::OkStatus();
  }

  // Writes whatever is left as a last, shorter shard.
  absl::Status finish() { return buffer_.empty() ? absl::OkStatus() : write(); }

  // Temporary and final paths of the shards written so far.
  const std::vector<std::string>& temp_paths() const { return temp_paths_; }
  const std::vector<std::string>& names() const { return names_; }
  const std::vector<uint64_t>& counts() const { return counts_; }
  uint64_t tokens() const { return tokens_; }
  uint64_t bytes() const { return bytes_; }
  uint64_t documents() const { return documents_; }

 private:
  absl::Status write() {
    const std::string name = absl::StrFormat("%s_%06d.bin", split_, names_.size());
    const std::string temp = join_path(out_dir_, temp_prefix_ + name);
    // The documents whose end token lies in this shard are the ones it counts.
    written_ += buffer_.size();
    uint64_t docs = 0;
    while (!doc_ends_.empty() && doc_ends_.front() <= written_) {
      doc_ends_.pop_front();
      ++docs;
    }
    // Record the temp path first: write_shard may fail after nothing was
    // created, and removing a missing file during cleanup is harmless.
    temp_paths_.push_back(temp);
    names_.push_back(name);
    absl::Status status = write_shard(temp, buffer_, vocab_size_,
                                      static_cast<uint32_t>(std::min<uint64_t>(docs, UINT32_MAX)));
    buffer_.clear();
    return status;
  }

  std::string split_, out_dir_, temp_prefix_;
  uint64_t shard_tokens_;
  int vocab_size_;
  std::vector<int32_t> buffer_;
  std::deque<uint64_t> doc_ends_;
  std::vector<uint64_t> counts_;
  std::vector<std::string> temp_paths_, names_;
  uint64_t tokens_ = 0, bytes_ = 0, documents_ = 0, written_ = 0;
};

// --- The preparation run --------------------------------------------------------

// A document held back from its split; see Preparer::route.
struct HeldDocument {
  std::string path;
  uint64_t key = 0;
  std::vector<int32_t> tokens;
  uint64_t bytes = 0;
};

class Preparer {
 public:
  Preparer(const PrepareOptions& options, const tokenizer::Tokenizer& tokenizer, int32_t separator,
           const std::string& prefix)
      : options_(options),
        tokenizer_(tokenizer),
        separator_(separator),
        train_("train", options.out_dir, prefix, options.shard_tokens,
               static_cast<int>(tokenizer.vocab_size())),
        val_("val", options.out_dir, prefix, options.shard_tokens,
             static_cast<int>(tokenizer.vocab_size())),
        last_progress_(std::chrono::steady_clock::now()) {}

  absl::Status walk_input(const std::string& input) {
    struct stat st;
    if (::stat(input.c_str(), &st) != 0) return errno_error(errno, input, "cannot read input");
    if (S_ISDIR(st.st_mode)) {
      // Documents inside a directory are named "<dir name>/<relative path>":
      // the same names `tar -C parent -cf x.tar <dir name>` would store, and
      // independent of where the corpus lives (the names key the split).
      std::string base = input;
      while (base.size() > 1 && base.back() == '/') base.pop_back();
      const size_t slash = base.find_last_of('/');
      if (slash != std::string::npos) base = base.substr(slash + 1);
      if (base == "." || base == ".." || base == "/") base.clear();
      return walk_dir(input, base);
    }
    if (!S_ISREG(st.st_mode)) {
      return absl::InvalidArgumentError(
          absl::StrCat("input ", input, " is neither a regular file nor a directory"));
    }
    if (is_archive_name(input)) return walk_archive(input);
    return visit_file(input, strip_dot_slash(input), /*joined=*/nullptr);  // its own document
  }

  absl::Status finish() {
    // Held documents go to the other split only if theirs would otherwise be
    // the only non-empty one; see route().
    auto flush_held = [](std::optional<HeldDocument>& held, SplitWriter& own,
                         SplitWriter& other) -> absl::Status {
      if (!held) return absl::OkStatus();
      SplitWriter& to = other.documents() == 0 && own.documents() > 0 ? other : own;
      absl::Status s = to.add(held->tokens, held->bytes);
      if (!s.ok()) return s;
      held.reset();
      return absl::OkStatus();
    };
    absl::Status s = flush_held(held_train_, train_, val_);
    if (!s.ok()) return s;
    s = flush_held(held_val_, val_, train_);
    if (!s.ok()) return s;
    s = train_.finish();
    if (!s.ok()) return s;
    return val_.finish();
  }

  void report_progress(bool force) {
    if (!options_.progress) return;
    const auto now = std::chrono::steady_clock::now();
    if (!force && now - last_progress_ < std::chrono::seconds(2)) return;
    last_progress_ = now;
    options_.progress(absl::StrFormat(
        "prepare: %d documents, %.1f MB read, %d tokens (%d train / %d val documents, %d skipped%s)",
        documents_, bytes_read_ / 1e6, train_.tokens() + val_.tokens() + held_tokens(),
        train_.documents(), val_.documents(), skipped_,
        options_.min_document_tokens > 0 ? absl::StrFormat(", %d short", short_) : ""));
  }

  SplitWriter& train() { return train_; }
  SplitWriter& val() { return val_; }
  uint64_t files_seen() const { return files_seen_; }
  uint64_t matched() const { return matched_; }
  uint64_t skipped() const { return skipped_; }
  uint64_t short_documents() const { return short_; }
  uint64_t empty() const { return empty_; }
  uint64_t documents() const { return documents_; }

 private:
  // Include/exclude globs; no FNM_PATHNAME, so '*' also matches '/'.
  bool wanted(const std::string& path) const {
    if (!options_.include.empty()) {
      bool any = false;
      for (const auto& pattern : options_.include) {
        if (::fnmatch(pattern.c_str(), path.c_str(), 0) == 0) {
          any = true;
          break;
        }
      }
      if (!any) return false;
    }
    for (const auto& pattern : options_.exclude) {
      if (::fnmatch(pattern.c_str(), path.c_str(), 0) == 0) return false;
    }
    return true;
  }

  bool budget_spent() const { return options_.max_bytes > 0 && bytes_read_ >= options_.max_bytes; }

  uint64_t held_tokens() const {
    return (held_train_ ? held_train_->tokens.size() : 0) + (held_val_ ? held_val_->tokens.size() : 0);
  }

  absl::Status walk_dir(const std::string& dir, const std::string& doc_prefix) {
    if (stop_) return absl::OkStatus();
    DIR* d = ::opendir(dir.c_str());
    if (d == nullptr) return errno_error(errno, dir, "cannot read directory");
    std::vector<std::string> names;
    while (struct dirent* e = ::readdir(d)) {
      if (std::strcmp(e->d_name, ".") == 0 || std::strcmp(e->d_name, "..") == 0) continue;
      names.emplace_back(e->d_name);
    }
    ::closedir(d);
    // readdir order depends on the file system: sort for reproducible shards.
    std::sort(names.begin(), names.end());
    // --join-dir: this directory's files make one document, written before its
    // subdirectories are walked (the order PathOrder gives an archive's directories).
    std::string joined;
    std::vector<std::pair<std::string, std::string>> subdirs;  // path, document path
    for (const auto& name : names) {
      if (stop_) break;
      const std::string path = join_path(dir, name);
      const std::string doc_path = doc_prefix.empty() ? name : doc_prefix + "/" + name;
      struct stat st;
      if (::lstat(path.c_str(), &st) != 0) return errno_error(errno, path, "cannot stat");
      if (S_ISDIR(st.st_mode)) {
        if (options_.join_dir) {
          subdirs.emplace_back(path, doc_path);
          continue;
        }
        absl::Status s = walk_dir(path, doc_path);
        if (!s.ok()) return s;
        continue;
      }
      // Symlinks to files are followed; symlinks to directories are not
      // (they can form cycles). Devices, sockets and fifos are ignored.
      if (S_ISLNK(st.st_mode) && (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode))) continue;
      if (!S_ISREG(st.st_mode)) continue;
      absl::Status s = visit_file(path, doc_path, options_.join_dir ? &joined : nullptr);
      if (!s.ok()) return s;
    }
    if (!joined.empty()) {
      absl::Status s = add_document(doc_prefix, joined);
      if (!s.ok()) return s;
    }
    for (const auto& [path, doc_path] : subdirs) {
      absl::Status s = walk_dir(path, doc_path);
      if (!s.ok()) return s;
    }
    return absl::OkStatus();
  }

  // A file: a document of its own, or appended to *joined (--join-dir).
  absl::Status visit_file(const std::string& path, const std::string& doc_path, std::string* joined) {
    ++files_seen_;
    if (!wanted(doc_path)) return absl::OkStatus();
    if (budget_spent()) {
      stop_ = true;
      return absl::OkStatus();
    }
    auto data = read_file(path);
    if (!data.ok()) return data.status();
    if (!accept(*data)) return absl::OkStatus();
    if (joined != nullptr) {
      joined->append(*data);
      return absl::OkStatus();
    }
    return add_document(doc_path, *data);
  }

  absl::Status walk_archive(const std::string& archive_path) {
#ifdef SPARSEFLASH_WITH_LIBARCHIVE
    struct archive* a = ::archive_read_new();
    ::archive_read_support_filter_all(a);
    ::archive_read_support_format_all(a);
    auto archive_error = [&](const std::string& what) {
      const char* msg = ::archive_error_string(a);
      absl::Status status = absl::DataLossError(
          absl::StrCat(archive_path, ": ", what, ": ", msg ? msg : "unknown libarchive error"));
      ::archive_read_free(a);
      return status;
    };
    if (::archive_read_open_filename(a, archive_path.c_str(), 1 << 16) != ARCHIVE_OK) {
      return archive_error("cannot open archive");
    }
    struct archive_entry* entry = nullptr;
    std::string data;
    // --join-dir: the matched members of each directory, written as one document per
    // directory once the archive has been read (a directory's members may lie anywhere
    // in it, so its whole matched text stays in memory until then).
    std::map<std::string, std::vector<std::pair<std::string, std::string>>, PathOrder> by_dir;
    while (!stop_) {
      const int r = ::archive_read_next_header(a, &entry);
      if (r == ARCHIVE_EOF) break;
      if (r < ARCHIVE_WARN) return archive_error("cannot read archive entry");
      if (::archive_entry_filetype(entry) != AE_IFREG) continue;  // dirs, links, devices
      const char* name = ::archive_entry_pathname(entry);
      const std::string doc_path = strip_dot_slash(name ? name : "");
      ++files_seen_;
      if (!wanted(doc_path)) continue;  // next_header skips the unread data
      if (budget_spent()) {
        stop_ = true;
        break;
      }
      // Entries are streamed; the size in the header is only a hint.
      data.clear();
      if (::archive_entry_size_is_set(entry) && ::archive_entry_size(entry) > 0) {
        data.reserve(static_cast<size_t>(::archive_entry_size(entry)));
      }
      char buffer[1 << 16];
      while (true) {
        const la_ssize_t n = ::archive_read_data(a, buffer, sizeof(buffer));
        if (n < 0) {
          if (n == ARCHIVE_WARN || n == ARCHIVE_RETRY) continue;
          return archive_error(absl::StrCat("cannot read member ", doc_path));
        }
        if (n == 0) break;
        data.append(buffer, static_cast<size_t>(n));
      }
      if (!accept(data)) continue;
      if (options_.join_dir) {
        by_dir[parent_path(doc_path)].emplace_back(doc_path, std::move(data));
        data = std::string();
        continue;
      }
      absl::Status s = add_document(doc_path, data);
      if (!s.ok()) {
        ::archive_read_free(a);
        return s;
      }
    }
    ::archive_read_free(a);
    for (auto& [dir, members] : by_dir) {
      std::stable_sort(members.begin(), members.end(),
                       [](const auto& x, const auto& y) { return x.first < y.first; });
      std::string joined;
      for (auto& member : members) {
        joined += member.second;
        member.second = std::string();
      }
      absl::Status s = add_document(dir, joined);
      if (!s.ok()) return s;
    }
    return absl::OkStatus();
#else
    return absl::UnimplementedError(absl::StrCat(
        "cannot read archive ", archive_path,
        ": sparseflash was built without libarchive (install libarchive-dev and rebuild)"));
#endif
  }

  // Counts a matched file; true when it is text (not empty, no NUL, valid UTF-8).
  bool accept(const std::string& text) {
    ++matched_;
    bytes_read_ += text.size();
    report_progress(false);
    if (text.empty()) {
      ++empty_;
      return false;
    }
    if (!is_text(text)) {
      ++skipped_;
      return false;
    }
    return true;
  }

  // Tokenizes a document, whole, and sends it to its split.
  absl::Status add_document(const std::string& doc_path, const std::string& text) {
    ++documents_;
    HeldDocument doc;
    doc.path = doc_path;
    doc.key = split_key(doc_path);
    doc.tokens = tokenizer_.encode(text, options_.add_bos);
    doc.tokens.push_back(separator_);
    if (doc.tokens.size() < options_.min_document_tokens) {
      ++short_;
      return absl::OkStatus();
    }
    doc.bytes = text.size();
    const bool to_val = static_cast<double>(doc.key) < options_.val_fraction * 1e6;
    return route(std::move(doc), to_val);
  }

  // Sends a document to its split, except that each split holds back one
  // candidate while the *other* split has no document yet: the train
  // document with the smallest split key (ties: path) and the val document
  // with the largest. If a split is still empty at the end, the other
  // split's candidate moves over (finish()). Choosing by key rather than by
  // position keeps the split independent of input order, and holding back a
  // single document keeps memory bounded.
  absl::Status route(HeldDocument doc, bool to_val) {
    SplitWriter& own = to_val ? val_ : train_;
    SplitWriter& other = to_val ? train_ : val_;
    std::optional<HeldDocument>& own_held = to_val ? held_val_ : held_train_;
    std::optional<HeldDocument>& other_held = to_val ? held_train_ : held_val_;

    // The other split's candidate is no longer needed: this split is not empty.
    if (other_held) {
      absl::Status s = other.add(other_held->tokens, other_held->bytes);
      if (!s.ok()) return s;
      other_held.reset();
    }
    const bool other_empty = other.documents() == 0;
    if (!other_empty) return own.add(doc.tokens, doc.bytes);

    auto better = [to_val](const HeldDocument& a, const HeldDocument& b) {
      // True when a is a better candidate to move than b.
      if (a.key != b.key) return to_val ? a.key > b.key : a.key < b.key;
      return to_val ? a.path > b.path : a.path < b.path;
    };
    if (!own_held) {
      own_held = std::move(doc);
      return absl::OkStatus();
    }
    if (better(doc, *own_held)) std::swap(doc, *own_held);
    return own.add(doc.tokens, doc.bytes);
  }

  const PrepareOptions& options_;
  const tokenizer::Tokenizer& tokenizer_;
  const int32_t separator_;
  SplitWriter train_, val_;
  std::optional<HeldDocument> held_train_, held_val_;
  std::chrono::steady_clock::time_point last_progress_;
  uint64_t files_seen_ = 0, matched_ = 0, skipped_ = 0, empty_ = 0, documents_ = 0, short_ = 0;
  uint64_t bytes_read_ = 0;
  bool stop_ = false;
};

// Cross-entropy of the val tokens under the add-one smoothed train unigram
// distribution, in bits, per val text byte.
double unigram_bits_per_byte(const std::vector<uint64_t>& train, const std::vector<uint64_t>& val,
                             uint64_t val_bytes) {
  if (val_bytes == 0) return 0.0;
  uint64_t train_total = 0;
  for (uint64_t c : train) train_total += c;
  const double denom = static_cast<double>(train_total) + static_cast<double>(train.size());
  double bits = 0;
  for (size_t v = 0; v < val.size(); ++v) {
    if (val[v] == 0) continue;
    bits -= static_cast<double>(val[v]) * std::log2((static_cast<double>(train[v]) + 1.0) / denom);
  }
  return bits / static_cast<double>(val_bytes);
}

std::string describe_filters(const PrepareOptions& options) {
  auto list = [](const std::vector<std::string>& v) {
    return v.empty() ? std::string("(none)") : absl::StrCat("[", absl::StrJoin(v, ", "), "]");
  };
  return absl::StrCat("include ", list(options.include), ", exclude ", list(options.exclude));
}

const std::regex& shard_name_regex() {
  static const std::regex re("^(train|val)_[0-9]{6,}\\.bin$");
  return re;
}

}  // namespace


// --- prepare() ------------------------------------------------------------------

absl::StatusOr<Meta> prepare(const PrepareOptions& options) {
  if (options.inputs.empty()) return absl::InvalidArgumentError("prepare: no inputs given");
  if (options.out_dir.empty()) return absl::InvalidArgumentError("prepare: no output directory given");
  if (!(options.val_fraction >= 0.0 && options.val_fraction <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("prepare: val_fraction must be in [0, 1], got ", options.val_fraction));
  }
  if (options.shard_tokens == 0) return absl::InvalidArgumentError("prepare: shard_tokens must be > 0");
  absl::StatusOr<std::unique_ptr<tokenizer::Tokenizer>> opened =
      tokenizer::open_tokenizer(options.tokenizer);
  if (!opened.ok()) return io::with_context(opened.status(), "prepare: tokenizer");
  std::unique_ptr<tokenizer::Tokenizer> tokenizer = *std::move(opened);
  const int64_t vocab_size = tokenizer->vocab_size();
  const int64_t separator =
      options.document_separator >= 0 ? options.document_separator : tokenizer->eos_id();
  if (separator < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prepare: the tokenizer ", options.tokenizer,
        " has no end-of-sequence token to write between documents; name one with "
        "--document-separator ID (an id in 0..", vocab_size - 1, ")"));
  }
  if (separator >= vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat("prepare: document separator ", separator,
                                                   " is outside the vocabulary of ", options.tokenizer,
                                                   " (", vocab_size, " tokens)"));
  }
  if (options.add_bos && !tokenizer->adds_bos()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prepare: add_bos: the tokenizer ", options.tokenizer,
        " puts nothing in front of a sequence (no BOS token, or its configuration adds none)"));
  }

  // Check every input before creating anything: a typo should not leave an
  // empty output directory behind.
  for (const auto& input : options.inputs) {
    struct stat st;
    if (::stat(input.c_str(), &st) != 0) {
      return errno_error(errno, input, "input does not exist or cannot be read:");
    }
  }

  const std::string& out = options.out_dir;
  std::vector<std::string> created_dirs;
  absl::Status status = make_dirs(out, out, &created_dirs);
  if (!status.ok()) return status;

  const std::string prefix = absl::StrCat(".prepare-", ::getpid(), "-");
  const std::string meta_temp = join_path(out, prefix + "meta.json");
  Preparer run(options, *tokenizer, static_cast<int32_t>(separator), prefix);

  // On any failure: remove every temporary file and the directories this run
  // created, so nothing partial is left behind and nothing old is replaced.
  auto cleanup = [&](absl::Status failure) {
    for (auto* w : {&run.train(), &run.val()}) {
      for (const auto& p : w->temp_paths()) {
        ::unlink(p.c_str());  // (a shard's own temporary is gone with its failed write)
      }
    }
    ::unlink(meta_temp.c_str());
    for (auto it = created_dirs.rbegin(); it != created_dirs.rend(); ++it) ::rmdir(it->c_str());
    return failure;
  };

  // Fail before reading the corpus if the directory is not writable.
  {
    const std::string probe = join_path(out, prefix + "probe");
    int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) return cleanup(errno_error(errno, out, "cannot write to output directory"));
    ::close(fd);
    ::unlink(probe.c_str());
  }

  for (const auto& input : options.inputs) {
    status = run.walk_input(input);
    if (!status.ok()) return cleanup(status);
  }
  status = run.finish();
  if (!status.ok()) return cleanup(status);

  if (run.files_seen() == 0) {
    return cleanup(absl::NotFoundError(absl::StrCat(
        "prepare: no files found in inputs [", absl::StrJoin(options.inputs, ", "), "]")));
  }
  if (run.matched() == 0) {
    return cleanup(absl::NotFoundError(absl::StrFormat(
        "prepare: no documents matched the filters (%s); %d files were seen",
        describe_filters(options), run.files_seen())));
  }
  if (run.documents() == 0) {
    return cleanup(absl::FailedPreconditionError(absl::StrFormat(
        "prepare: all %d matched documents were filtered out (%d binary or invalid UTF-8, %d "
        "empty)",
        run.matched(), run.skipped(), run.empty())));
  }
  if (run.train().documents() + run.val().documents() == 0) {
    return cleanup(absl::FailedPreconditionError(absl::StrFormat(
        "prepare: all %d documents are shorter than --min-document-tokens %d",
        run.short_documents(), options.min_document_tokens)));
  }

  run.report_progress(/*force=*/true);

  Meta meta;
  meta.tokenizer = tokenizer->identity();
  meta.tokenizer_source = options.tokenizer == "byte"
                              ? "byte"
                              : std::filesystem::absolute(options.tokenizer).lexically_normal().string();
  meta.tokenizer_kind = tokenizer->kind();
  meta.vocab_size = static_cast<int>(vocab_size);
  meta.document_separator = separator;
  meta.add_bos = options.add_bos;
  meta.train_tokens = run.train().tokens();
  meta.train_documents = run.train().documents();
  meta.train_bytes = run.train().bytes();
  meta.train_shards = run.train().names();
  meta.val_tokens = run.val().tokens();
  meta.val_documents = run.val().documents();
  meta.val_bytes = run.val().bytes();
  meta.val_shards = run.val().names();
  meta.skipped_documents = run.skipped();
  meta.min_document_tokens = options.min_document_tokens;
  meta.short_documents = run.short_documents();
  meta.unigram_bits_per_byte =
      unigram_bits_per_byte(run.train().counts(), run.val().counts(), meta.val_bytes);

  // Commit: meta.json is staged first, then the shards are renamed into
  // place, and meta.json last, so that a reader never sees a meta.json
  // listing shards of a different run that are not there.
  status = io::write_file_atomically(meta_temp, meta_json(meta));
  if (!status.ok()) return cleanup(status);
  for (auto* w : {&run.train(), &run.val()}) {
    for (size_t i = 0; i < w->names().size(); ++i) {
      const std::string final_path = join_path(out, w->names()[i]);
      if (::rename(w->temp_paths()[i].c_str(), final_path.c_str()) != 0) {
        return cleanup(errno_error(errno, final_path, "cannot move shard into place:"));
      }
    }
  }
  const std::string meta_path = join_path(out, "meta.json");
  if (::rename(meta_temp.c_str(), meta_path.c_str()) != 0) {
    return cleanup(errno_error(errno, meta_path, "cannot move into place:"));
  }

  // Shards of an earlier, larger prepare would otherwise linger and confuse.
  std::vector<std::string> keep = meta.train_shards;
  keep.insert(keep.end(), meta.val_shards.begin(), meta.val_shards.end());
  if (DIR* d = ::opendir(out.c_str())) {
    std::vector<std::string> stale;
    while (struct dirent* e = ::readdir(d)) {
      const std::string name = e->d_name;
      if (std::regex_match(name, shard_name_regex()) &&
          std::find(keep.begin(), keep.end(), name) == keep.end()) {
        stale.push_back(name);
      }
    }
    ::closedir(d);
    for (const auto& name : stale) ::unlink(join_path(out, name).c_str());
  }
  return meta;
}

}  // namespace sparseflash::data
