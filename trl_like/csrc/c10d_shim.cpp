// A C interface to the few pieces of libtorch's c10d that data-parallel
// training needs: a TCPStore rendezvous, a Gloo (CPU) or NCCL (CUDA) process
// group, and in-place all-reduce / broadcast / barrier, reduce-scatter and
// all-gather on tensors.
//
// tch does not bind c10d, and its classes are C++ (intrusive_ptr, exceptions),
// so this file is the only place that touches them. Every entry point catches
// every exception and returns it as a malloc'd message (freed with
// trl_c10d_free_error), so no C++ exception ever unwinds into Rust.
// Tensors arrive as tch's `C_tensor*`, which is a `torch::Tensor*`.

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef TRL_C10D_WITH_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

char* copy_message(const char* what) {
  const char* text = what ? what : "unknown C++ exception";
  char* out = static_cast<char*>(std::malloc(std::strlen(text) + 1));
  if (out) std::strcpy(out, text);
  return out;
}

// Runs `body`, turning any exception into an error message; returns 0 on success.
template <typename F>
int guarded(char** error, F&& body) {
  try {
    body();
    return 0;
  } catch (const c10::Error& e) {
    // what_without_backtrace: the C++ backtrace is noise for a user.
    *error = copy_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    *error = copy_message(e.what());
  } catch (...) {
    *error = copy_message(nullptr);
  }
  return 1;
}

c10d::ReduceOp reduce_op(int op) {
  switch (op) {
    case 1:
      return c10d::ReduceOp::MAX;
    case 2:
      return c10d::ReduceOp::MIN;
    default:
      return c10d::ReduceOp::SUM;
  }
}

void wait(const c10::intrusive_ptr<c10d::Work>& work, std::chrono::milliseconds timeout) {
  // wait() rethrows the collective's error (a peer that left, a timeout).
  work->wait(timeout);
}

}  // namespace

extern "C" {

// Creates the store and the process group. `backend` is "gloo" or "nccl".
// `is_server`: this process hosts the TCPStore (rank 0 without torchrun's
// agent store). `prefix` namespaces this group's keys in the store.
// `cuda_device`: the GPU this rank drives (NCCL only; it becomes the current
// device and the group's bound device, so barriers need not guess it).
// Returns an opaque handle, or null with `*error` set.
void* trl_c10d_new(
    const char* backend,
    const char* host,
    uint16_t port,
    int rank,
    int world_size,
    int is_server,
    const char* prefix,
    int64_t timeout_ms,
    int cuda_device,
    char** error) {
  Group* group = nullptr;
  guarded(error, [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = is_server != 0;
    opts.numWorkers = world_size;
    opts.waitWorkers = true;
    opts.timeout = timeout;
    opts.multiTenant = true;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    c10::intrusive_ptr<c10d::Store> store =
        c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    std::string name(backend);
    c10::intrusive_ptr<c10d::Backend> pg;
    if (name == "gloo") {
      auto options = c10d::ProcessGroupGloo::Options::create(timeout);
      const char* iface = std::getenv("GLOO_SOCKET_IFNAME");
      options->devices.push_back(
          iface && *iface ? c10d::ProcessGroupGloo::createDeviceForInterface(iface)
                          : c10d::ProcessGroupGloo::createDefaultDevice());
      pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world_size, options);
    } else if (name == "nccl") {
#ifdef TRL_C10D_WITH_NCCL
      c10::cuda::set_device(static_cast<c10::DeviceIndex>(cuda_device));
      auto options = c10d::ProcessGroupNCCL::Options::create();
      options->timeout = timeout;
      pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world_size, options);
      pg->setBoundDeviceId(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(cuda_device)));
#else
      throw std::runtime_error(
          "this build has no NCCL support (the c10d shim was compiled without the CUDA/NCCL "
          "headers); use --ddp_backend gloo or rebuild with them (see docs/DISTRIBUTED.md)");
#endif
    } else {
      throw std::runtime_error("unknown c10d backend '" + name + "' (expected gloo or nccl)");
    }
    group = new Group{store, pg, timeout};
  });
  return group;
}

// 1 when this build can create NCCL process groups.
int trl_c10d_has_nccl() {
#ifdef TRL_C10D_WITH_NCCL
  return 1;
#else
  return 0;
#endif
}

// In-place all-reduce of one tensor; op 0 = sum, 1 = max, 2 = min.
int trl_c10d_all_reduce(void* handle, void* tensor, int op, char** error) {
  return guarded(error, [&] {
    auto* group = static_cast<Group*>(handle);
    std::vector<at::Tensor> tensors{*static_cast<at::Tensor*>(tensor)};
    c10d::AllreduceOptions opts;
    opts.reduceOp = reduce_op(op);
    opts.timeout = group->timeout;
    wait(group->backend->allreduce(tensors, opts), group->timeout);
  });
}

// In-place broadcast of one tensor from `root`.
int trl_c10d_broadcast(void* handle, void* tensor, int root, char** error) {
  return guarded(error, [&] {
    auto* group = static_cast<Group*>(handle);
    std::vector<at::Tensor> tensors{*static_cast<at::Tensor*>(tensor)};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.timeout = group->timeout;
    wait(group->backend->broadcast(tensors, opts), group->timeout);
  });
}

// Reduce-scatter of one flat tensor (torch's reduce_scatter_tensor): `input`
// holds world_size equal pieces; rank r's `output` receives the sum of every
// rank's piece r.
int trl_c10d_reduce_scatter(void* handle, void* output, void* input, char** error) {
  return guarded(error, [&] {
    auto* group = static_cast<Group*>(handle);
    c10d::ReduceScatterOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    opts.timeout = group->timeout;
    wait(group->backend->_reduce_scatter_base(
             *static_cast<at::Tensor*>(output), *static_cast<at::Tensor*>(input), opts),
         group->timeout);
  });
}

// All-gather into one flat tensor (torch's all_gather_into_tensor): `output`
// receives every rank's `input`, rank by rank.
int trl_c10d_all_gather(void* handle, void* output, void* input, char** error) {
  return guarded(error, [&] {
    auto* group = static_cast<Group*>(handle);
    c10d::AllgatherOptions opts;
    opts.timeout = group->timeout;
    wait(group->backend->_allgather_base(
             *static_cast<at::Tensor*>(output), *static_cast<at::Tensor*>(input), opts),
         group->timeout);
  });
}

int trl_c10d_barrier(void* handle, char** error) {
  return guarded(error, [&] {
    auto* group = static_cast<Group*>(handle);
    c10d::BarrierOptions opts;
    opts.timeout = group->timeout;
    wait(group->backend->barrier(opts), group->timeout);
  });
}

void trl_c10d_free(void* handle) {
  auto* group = static_cast<Group*>(handle);
  if (!group) return;
  try {
    group->backend->shutdown();
  } catch (...) {
    // A peer may already be gone; there is nothing left to release cleanly.
  }
  delete group;
}

void trl_c10d_free_error(char* error) { std::free(error); }

}  // extern "C"
