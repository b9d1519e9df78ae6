// Suffix index over token sequences: bounded ring of tokens + one hash chain per context order.
//
// What it answers: "the last n tokens of this context occurred before; what most often followed them?" — the
// proposal step of suffix decoding (SuffixDecoding, arXiv 2411.04975), with match orders tried longest first.
//
// Layout (C = capacity in tokens, H = hash-table size, a power of two):
//   ring   int32 [C]      token at absolute position p lives at ring[p % C]; SEP (-1) separates sequences
//   head_k uint32 [H]     per order k: low 32 bits of the absolute position of the newest k-gram with that hash
//   prev_k uint32 [C]     per order k: for the k-gram ending at p, the position of the previous one with its hash
// A position is live while end - C <= p < end; chains are walked newest first and stop at the first dead link,
// so evicting the oldest tokens is just overwriting the ring. Every candidate is re-checked against the ring
// (hash collisions cost a comparison, never a wrong match). Memory: 4·C·(1 + orders) + 4·H·orders bytes.
//
// propose(): for the longest order whose k-gram has live earlier occurrences, walk up to max_candidates of them
// and grow one continuation token by token: at each depth the token most candidates agree on (ties: the newest
// candidate's), keeping only the candidates that agree. confidence[d] = agreeing candidates / all candidates
// (SuffixDecoding's frequency-based path probability); the walk stops below min_confidence. A continuation that
// reaches the end of the index (the context itself, for a per-request index) reads on into the proposal, so a
// loop keeps proposing the loop.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int32_t SEP = -1;

uint32_t hash_tokens(const int32_t* t, int k) {
  uint64_t h = 1469598103934665603ull;
  for (int i = 0; i < k; ++i) {
    h ^= static_cast<uint32_t>(t[i]);
    h *= 1099511628211ull;
  }
  return static_cast<uint32_t>(h ^ (h >> 29));
}

class SuffixIndex {
 public:
  SuffixIndex(int64_t capacity, std::vector<int> orders, int max_candidates)
      : cap_(capacity), orders_(std::move(orders)), max_candidates_(max_candidates) {
    if (cap_ < 16 || cap_ >= (int64_t(1) << 31)) throw std::invalid_argument("capacity must be in [16, 2^31)");
    if (orders_.empty()) throw std::invalid_argument("at least one match order is needed");
    std::sort(orders_.begin(), orders_.end(), std::greater<int>());  // longest first
    if (orders_.back() < 1 || orders_.front() > 64) throw std::invalid_argument("orders must be in [1, 64]");
    if (max_candidates_ < 1) throw std::invalid_argument("max_candidates must be >= 1");
    int64_t h = 1024;  // about one bucket per two tokens: collisions only cost a comparison
    while (h < cap_ / 2) h <<= 1;
    mask_ = static_cast<uint32_t>(h - 1);
    ring_.assign(cap_, SEP);
    heads_.assign(orders_.size(), std::vector<uint32_t>(h, kEmpty));
    prevs_.assign(orders_.size(), std::vector<uint32_t>(cap_, kEmpty));
  }

  // Append tokens to the open sequence (ids must be >= 0).
  void extend(py::array_t<int32_t, py::array::c_style | py::array::forcecast> tokens) {
    auto t = tokens.unchecked<1>();
    for (py::ssize_t i = 0; i < t.shape(0); ++i) {
      if (t(i) < 0) throw std::invalid_argument("token ids must be >= 0");
    }
    for (py::ssize_t i = 0; i < t.shape(0); ++i) push(t(i));
  }

  // Close the open sequence: later matches never run across the boundary.
  void end_sequence() {
    if (end_ > 0 && at(end_ - 1) != SEP) push(SEP);
  }

  void clear() {
    std::fill(ring_.begin(), ring_.end(), SEP);
    for (auto& v : heads_) std::fill(v.begin(), v.end(), kEmpty);
    for (auto& v : prevs_) std::fill(v.begin(), v.end(), kEmpty);
    end_ = 0;
  }

  // (tokens, confidence per token, matched order, candidates) for the context's continuation; empty when none.
  py::tuple propose(py::array_t<int32_t, py::array::c_style | py::array::forcecast> context, int max_len,
                    double min_confidence) const {
    auto c = context.unchecked<1>();
    const int64_t n = c.shape(0);
    std::vector<int32_t> out;
    std::vector<float> conf;
    int matched = 0;
    int num_cand = 0;
    if (max_len > 0 && n > 0) {
      const int32_t* ctx = c.data(0);
      for (size_t oi = 0; oi < orders_.size() && matched == 0; ++oi) {
        const int k = orders_[oi];
        if (n < k) continue;
        std::vector<int64_t> cand = candidates(oi, ctx + n - k, k);
        if (cand.empty()) continue;
        matched = k;
        num_cand = static_cast<int>(cand.size());
        grow(cand, max_len, min_confidence, &out, &conf);
      }
    }
    return py::make_tuple(out, conf, matched, num_cand);
  }

  int64_t size() const { return std::min<int64_t>(end_, cap_); }
  int64_t total_appended() const { return end_; }
  int64_t capacity() const { return cap_; }
  int64_t memory_bytes() const {
    return static_cast<int64_t>(ring_.size() * 4 + orders_.size() * ((mask_ + 1ull) * 4 + cap_ * 4));
  }
  std::vector<int> orders() const { return orders_; }

 private:
  static constexpr uint32_t kEmpty = 0xffffffffu;

  int32_t at(int64_t p) const { return ring_[p % cap_]; }
  bool live(int64_t p) const { return p >= 0 && p < end_ && p >= end_ - cap_; }

  // The absolute position a stored low-32-bit position stands for (the newest one not after `before`).
  int64_t widen(uint32_t stored, int64_t before) const {
    const uint32_t low = static_cast<uint32_t>(before);
    return before - static_cast<int64_t>(static_cast<uint32_t>(low - stored));
  }

  void push(int32_t tok) {
    const int64_t p = end_;
    ring_[p % cap_] = tok;
    end_ = p + 1;
    for (size_t oi = 0; oi < orders_.size(); ++oi) {
      const int k = orders_[oi];
      uint32_t& prev = prevs_[oi][p % cap_];
      prev = kEmpty;
      if (p + 1 < k) continue;
      int32_t gram[64];
      bool ok = true;
      for (int i = 0; i < k; ++i) {
        gram[i] = at(p - k + 1 + i);
        if (gram[i] == SEP || p - k + 1 + i < end_ - cap_) { ok = false; break; }
      }
      if (!ok) continue;
      uint32_t& head = heads_[oi][hash_tokens(gram, k) & mask_];
      prev = head;
      head = static_cast<uint32_t>(p);
    }
  }

  // Positions q (newest first) where the k-gram `gram` ended earlier and something follows (q + 1 < end, or the
  // proposal continues the context itself).
  std::vector<int64_t> candidates(size_t oi, const int32_t* gram, int k) const {
    std::vector<int64_t> out;
    uint32_t stored = heads_[oi][hash_tokens(gram, k) & mask_];
    int64_t bound = end_ - 1;  // chains only go back in time
    int steps = 0;
    while (stored != kEmpty && steps < 4 * max_candidates_ && static_cast<int>(out.size()) < max_candidates_) {
      const int64_t q = widen(stored, bound);
      if (q < 0 || !live(q) || q - k + 1 < end_ - cap_) break;
      ++steps;
      bool same = true;
      for (int i = 0; i < k && same; ++i) same = at(q - k + 1 + i) == gram[i];
      // q == end - 1 is the context's own last k-gram (a per-request index): nothing follows it yet
      if (same && q + 1 < end_ && at(q + 1) != SEP) out.push_back(q);
      stored = prevs_[oi][q % cap_];
      bound = q - 1;
    }
    return out;
  }

  void grow(std::vector<int64_t> cand, int max_len, double min_confidence, std::vector<int32_t>* out,
            std::vector<float>* conf) const {
    const double total = static_cast<double>(cand.size());
    std::vector<int32_t> next(cand.size());
    std::vector<std::pair<int32_t, int>> counts;
    for (int d = 0; d < max_len && !cand.empty(); ++d) {
      counts.clear();
      for (size_t i = 0; i < cand.size(); ++i) {
        const int64_t pos = cand[i] + 1 + d;
        // past the index's end the continuation reads on into the proposal (a loop proposes the loop)
        next[i] = pos < end_ ? at(pos) : (pos - end_ < static_cast<int64_t>(out->size()) ? (*out)[pos - end_] : SEP);
        if (next[i] == SEP) continue;
        auto it = std::find_if(counts.begin(), counts.end(), [&](auto& e) { return e.first == next[i]; });
        if (it == counts.end()) counts.emplace_back(next[i], 1); else ++it->second;
      }
      if (counts.empty()) break;
      // most frequent; ties go to the token seen first, i.e. the newest candidate's
      auto best = counts.begin();
      for (auto it = counts.begin(); it != counts.end(); ++it) if (it->second > best->second) best = it;
      const double c = best->second / total;
      if (c < min_confidence) break;
      const int32_t tok = best->first;
      out->push_back(tok);
      conf->push_back(static_cast<float>(c));
      size_t w = 0;
      for (size_t i = 0; i < cand.size(); ++i) if (next[i] == tok) cand[w++] = cand[i];
      cand.resize(w);
    }
  }

  int64_t cap_;
  std::vector<int> orders_;
  int max_candidates_;
  uint32_t mask_ = 0;
  int64_t end_ = 0;
  std::vector<int32_t> ring_;
  std::vector<std::vector<uint32_t>> heads_;
  std::vector<std::vector<uint32_t>> prevs_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<SuffixIndex>(m, "SuffixIndex")
      .def(py::init<int64_t, std::vector<int>, int>(), py::arg("capacity"), py::arg("orders"),
           py::arg("max_candidates"))
      .def("extend", &SuffixIndex::extend)
      .def("end_sequence", &SuffixIndex::end_sequence)
      .def("clear", &SuffixIndex::clear)
      .def("propose", &SuffixIndex::propose, py::arg("context"), py::arg("max_len"), py::arg("min_confidence"))
      .def_property_readonly("size", &SuffixIndex::size)
      .def_property_readonly("total_appended", &SuffixIndex::total_appended)
      .def_property_readonly("capacity", &SuffixIndex::capacity)
      .def_property_readonly("memory_bytes", &SuffixIndex::memory_bytes)
      .def_property_readonly("orders", &SuffixIndex::orders);
}
