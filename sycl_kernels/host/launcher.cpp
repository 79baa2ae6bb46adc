// The host side of xpu_coopt's SYCL backend: a C ABI over the SYCL runtime, loaded from Python with ctypes.
//
// It does four things: make (or adopt) a queue, compile SYCL source at run time into a kernel bundle
// (SYCL-RTC, sycl_ext_oneapi_kernel_compiler), look kernels up by name, and launch them with raw
// argument bytes. Everything device-specific lives in the kernel sources; this file never changes per op.
// Built with plain g++ against the headers of the installed intel-sycl-rt wheel (xpu_coopt/backends/sycl/runtime.py).
//
// Errors never cross the C ABI as exceptions: each call returns null/nonzero and writes the message,
// compiler log included, into the caller's buffer.

#include <sycl/sycl.hpp>

#include <cstring>
#include <string>
#include <vector>

namespace syclexp = sycl::ext::oneapi::experimental;

namespace {

void report(char* error, size_t capacity, const std::string& message) {
  if (error == nullptr || capacity == 0) return;
  std::strncpy(error, message.c_str(), capacity - 1);
  error[capacity - 1] = '\0';
}

struct Queue {
  sycl::queue* queue;
  bool owned;  // false for a queue adopted from torch (torch.xpu.current_stream().sycl_queue)
};

using ExecutableBundle = sycl::kernel_bundle<sycl::bundle_state::executable>;

}  // namespace

extern "C" {

// A new in-order queue on the first OpenCL CPU device: how CI runs the XPU kernels on host memory.
void* xc_queue_create_cpu(char* error, size_t capacity) {
  try {
    for (const auto& platform : sycl::platform::get_platforms()) {
      if (platform.get_backend() != sycl::backend::opencl) continue;
      for (const auto& device : platform.get_devices(sycl::info::device_type::cpu)) {
        auto* queue = new sycl::queue(device, sycl::property::queue::in_order());
        return new Queue{queue, true};
      }
    }
    report(error, capacity, "no OpenCL CPU device found by the SYCL runtime");
  } catch (const std::exception& e) {
    report(error, capacity, e.what());
  }
  return nullptr;
}

// Adopts an existing sycl::queue (torch's current XPU stream); the caller keeps it alive.
void* xc_queue_adopt(void* queue) { return new Queue{static_cast<sycl::queue*>(queue), false}; }

void xc_queue_release(void* handle) {
  auto* q = static_cast<Queue*>(handle);
  if (q->owned) delete q->queue;
  delete q;
}

// The device's name, and whether it has the aspects a kernel needs, for error messages and checks.
int xc_device_name(void* handle, char* name, size_t capacity) {
  auto* q = static_cast<Queue*>(handle);
  report(name, capacity, q->queue->get_device().get_info<sycl::info::device::name>());
  return 0;
}

// Compiles `source` (SYCL 2020 with free-function kernels) for the queue's device. `includes` are
// `count` (name, text) pairs made visible to #include; `options` are `option_count` compiler flags.
// On failure returns null and writes the compiler's log.
void* xc_bundle_build(void* handle, const char* source, int include_count, const char** include_names,
                      const char** include_texts, int option_count, const char** options, char* error,
                      size_t capacity) {
  auto* q = static_cast<Queue*>(handle);
  std::string log;
  try {
    syclexp::include_files includes;
    for (int i = 0; i < include_count; ++i) includes.add(include_names[i], include_texts[i]);
    std::vector<std::string> flags(options, options + option_count);
    auto context = q->queue->get_context();
    auto input = syclexp::create_kernel_bundle_from_source(
        context, syclexp::source_language::sycl, std::string(source),
        syclexp::properties{includes});
    auto built = syclexp::build(
        input, std::vector<sycl::device>{q->queue->get_device()},
        syclexp::properties{syclexp::build_options{flags}, syclexp::save_log{&log}});
    return new ExecutableBundle(std::move(built));
  } catch (const std::exception& e) {
    report(error, capacity, std::string(e.what()) + (log.empty() ? "" : "\ncompiler log:\n" + log));
  }
  return nullptr;
}

void xc_bundle_release(void* bundle) { delete static_cast<ExecutableBundle*>(bundle); }

void* xc_kernel_get(void* bundle, const char* name, char* error, size_t capacity) {
  try {
    auto* b = static_cast<ExecutableBundle*>(bundle);
    return new sycl::kernel(b->ext_oneapi_get_kernel(name));
  } catch (const std::exception& e) {
    report(error, capacity, std::string("kernel ") + name + ": " + e.what());
  }
  return nullptr;
}

void xc_kernel_release(void* kernel) { delete static_cast<sycl::kernel*>(kernel); }

// Enqueues `kernel` over a 1-D nd_range(global, local). Argument i is the pointer args[i] itself when
// arg_sizes[i] is 0 (a USM or host pointer: the OpenCL backend must be told it is one, raw bytes are
// rejected), otherwise arg_sizes[i] raw bytes at args[i] (a scalar). Asynchronous: xc_queue_wait to finish.
int xc_launch(void* handle, void* kernel, size_t global, size_t local, int arg_count, const void** args,
              const size_t* arg_sizes, char* error, size_t capacity) {
  auto* q = static_cast<Queue*>(handle);
  auto* k = static_cast<sycl::kernel*>(kernel);
  try {
    q->queue->submit([&](sycl::handler& h) {
      for (int i = 0; i < arg_count; ++i) {
        if (arg_sizes[i] == 0)
          h.set_arg(i, const_cast<void*>(args[i]));
        else
          h.set_arg(i, syclexp::raw_kernel_arg(args[i], arg_sizes[i]));
      }
      h.parallel_for(sycl::nd_range<1>{global, local}, *k);
    });
    return 0;
  } catch (const std::exception& e) {
    report(error, capacity, e.what());
  }
  return 1;
}

int xc_queue_wait(void* handle, char* error, size_t capacity) {
  try {
    static_cast<Queue*>(handle)->queue->wait_and_throw();
    return 0;
  } catch (const std::exception& e) {
    report(error, capacity, e.what());
  }
  return 1;
}

}  // extern "C"
