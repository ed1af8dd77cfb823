// main() of the multi-rank GoogleTest executables (freqkv_mpi_test in tests/CMakeLists.txt).
//
// Every rank runs every test in the same order, so the tests may call collectives. Rank 0 prints
// GoogleTest's usual output; the other ranks print only their failures, prefixed "[rank r]". A
// failure on any rank fails the process on every rank: the ranks all-reduce a failure flag at
// the end, so mpirun (and ctest) see a non-zero exit status whichever rank failed.
//
// A test must not leave a collective on some ranks only (an ASSERT_* that returns before a
// collective the other ranks enter would hang the job; ctest's TIMEOUT ends it): check with
// EXPECT_* and keep collectives unconditional.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>
#include <string>

#include "comm/mpi_communicator.h"

namespace {

class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : prefix_("[rank " + std::to_string(rank) + "] ") {}

  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::string text = prefix_ + (result.file_name() ? result.file_name() : "(unknown file)") +
                       ":" + std::to_string(result.line_number()) + ": Failure\n";
    // Every line of the message carries the prefix: the ranks' lines interleave.
    std::string line;
    for (const char* c = result.message(); *c; ++c) {
      if (*c == '\n') {
        text += prefix_ + line + "\n";
        line.clear();
      } else {
        line += *c;
      }
    }
    if (!line.empty()) text += prefix_ + line + "\n";
    std::fputs(text.c_str(), stderr);
  }

  void OnTestEnd(const ::testing::TestInfo& info) override {
    if (info.result()->Failed()) {
      std::fprintf(stderr, "%s[  FAILED  ] %s.%s\n", prefix_.c_str(), info.test_suite_name(),
                   info.name());
    }
  }

 private:
  std::string prefix_;
};

}  // namespace

int main(int argc, char** argv) {
  freqkv::MpiSession session(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  const int rank = freqkv::MpiSession::world_rank();
  const int size = freqkv::MpiSession::world_size();
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(rank));
  }
  int failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (rank == 0) {
    std::printf("[mpi] %d %s: %s\n", size, size == 1 ? "rank" : "ranks",
                failed ? "FAILED (on at least one rank, see the [rank r] lines)"
                       : "all tests passed on every rank");
    std::fflush(stdout);
  }
  return failed ? 1 : 0;
}
