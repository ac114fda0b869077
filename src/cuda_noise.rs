//! The noise of CUDA ops in one fused kernel: each GPU thread computes Philox4x32-10 blocks
//! and turns their words into Normal (Box-Muller pairs) or Gumbel values, exactly as
//! `Noise::sample_on_libtorch` (crate::noise) does with about 130 libtorch operations.
//!
//! The kernel is compiled at run time with NVRTC (shipped with libtorch's CUDA build) for
//! the device's compute capability, once per process and device, and launched through the
//! CUDA driver API in the device's primary context (the one libtorch uses), on libtorch's
//! current stream ([`crate::cuda_stream`]): ordered after that stream's earlier work and
//! before libtorch's next operation there, with no device-wide synchronization. Where
//! libtorch's stream functions are not found, it runs on the legacy default stream with
//! the device synchronized before and after.
//!
//! Anything missing (no NVRTC, a driver without the functions, a compile failure), or
//! libtorch's memory or stream in a CUDA context other than the device's primary one,
//! makes [`sample`] answer `None` and the caller uses the libtorch operations: slower, the
//! same values.

use crate::error::{Error, Result, Status};
use crate::rng::Stream;
use once_cell::sync::OnceCell;
use std::collections::HashMap;
use std::ffi::{c_int, c_uint, c_void};
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// The kernel's source. Words and transforms follow crate::rng and Noise::sample_on_libtorch.
pub(crate) const SOURCE: &str = r#"
__device__ __forceinline__ float pert_unit(unsigned int w) {
  return ((float)(w >> 9) + 0.5f) * (1.0f / 8388608.0f);
}

extern "C" __global__ void pert_noise(float *__restrict__ out, unsigned long long first,
                                      unsigned long long count, unsigned int k0,
                                      unsigned int k1, unsigned int s0, unsigned int s1,
                                      int gumbel) {
  const unsigned long long start = first >> 2;
  const unsigned long long blocks = ((first + count + 3) >> 2) - start;
  const unsigned long long step = (unsigned long long)gridDim.x * blockDim.x;
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
       i < blocks; i += step) {
    const unsigned long long index = start + i;
    unsigned int c0 = (unsigned int)index, c1 = (unsigned int)(index >> 32), c2 = s0, c3 = s1;
    unsigned int a = k0, b = k1;
#pragma unroll
    for (int r = 0; r < 10; r++) {
      const unsigned int hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
      const unsigned int hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
      c0 = hi1 ^ c1 ^ a;
      c1 = lo1;
      c2 = hi0 ^ c3 ^ b;
      c3 = lo0;
      a += 0x9E3779B9u;
      b += 0xBB67AE85u;
    }
    const float u[4] = {pert_unit(c0), pert_unit(c1), pert_unit(c2), pert_unit(c3)};
    float v[4];
    if (gumbel) {
#pragma unroll
      for (int j = 0; j < 4; j++) v[j] = -logf(-logf(u[j]));
    } else {
#pragma unroll
      for (int p = 0; p < 2; p++) {
        const float radius = sqrtf(logf(u[2 * p]) * -2.0f);
        const float angle = u[2 * p + 1] * 6.2831853071795864f;
        v[2 * p] = radius * cosf(angle);
        v[2 * p + 1] = radius * sinf(angle);
      }
    }
    const unsigned long long e0 = index * 4;
    if (e0 >= first && e0 + 4 <= first + count) {
#pragma unroll
      for (int j = 0; j < 4; j++) out[e0 - first + j] = v[j];
    } else {
      for (int j = 0; j < 4; j++) {
        const unsigned long long e = e0 + j;
        if (e >= first && e < first + count) out[e - first] = v[j];
      }
    }
  }
}
"#;

use crate::cuda_libraries::CuResult;
type CuDevice = c_int;
type CuContext = *mut c_void;
type CuModule = *mut c_void;
type CuFunction = *mut c_void;

/// The driver and NVRTC functions the kernel needs.
struct Api {
    driver: &'static crate::cuda_libraries::DriverApi,
    nvrtc: &'static crate::nvrtc::Nvrtc,
}

/// The driver API and NVRTC (None when either is missing).
fn api() -> Option<Api> {
    Some(Api {
        driver: crate::cuda_libraries::driver_api()?,
        nvrtc: crate::nvrtc::nvrtc()?,
    })
}

/// The kernel on one device: its primary context and function.
#[derive(Clone, Copy)]
struct Launcher {
    context: CuContext,
    function: CuFunction,
}

/// The kernel loaded on one device, and the form of its code: "CUBIN sm_90", or "PTX
/// compute_90 (no CUBIN: why)".
struct Loaded {
    launcher: Launcher,
    form: String,
}

// SAFETY: a CUDA context and function handle may be used from any thread.
unsafe impl Send for Loaded {}

/// `f` of the kernel for device `index`, compiled and loaded once (or of why it is
/// unavailable; the first failure is remembered).
fn kernel<R>(
    api: &Api,
    index: usize,
    f: impl FnOnce(&std::result::Result<Loaded, String>) -> R,
) -> R {
    static KERNELS: OnceCell<Mutex<HashMap<usize, std::result::Result<Loaded, String>>>> =
        OnceCell::new();
    let kernels = KERNELS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut kernels = kernels.lock().unwrap_or_else(|p| p.into_inner());
    f(kernels.entry(index).or_insert_with(|| load(api, index)))
}

/// Whether the library's stderr message is silenced: the environment variable
/// PERTURBATIONS_QUIET is set, not empty and not "0".
pub(crate) fn quiet() -> bool {
    std::env::var_os("PERTURBATIONS_QUIET").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Says once per process, on stderr, that CUDA noise takes the slow path and why, unless
/// the environment variable PERTURBATIONS_QUIET is set (not empty, not "0").
fn warn_fallback(why: &str) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) || quiet() {
        return;
    }
    eprintln!(
        "perturbations: the fused CUDA noise kernel is unavailable ({why}); CUDA ops draw \
         their noise with libtorch operations instead: the same values, about 90 times \
         slower. pert_device_report() says more; PERTURBATIONS_QUIET=1 silences this message."
    );
}

fn load(api: &Api, index: usize) -> std::result::Result<Loaded, String> {
    let check = |what: &str, code: CuResult| {
        if code == 0 {
            Ok(())
        } else {
            Err(format!("{what} returned CUDA error {code}"))
        }
    };
    // SAFETY: driver API calls with valid out-pointers; the context is the device's primary
    // context (retained, never released: it lives as long as the process), made current
    // only around the module calls and popped on every path.
    unsafe {
        crate::cuda_libraries::mark_cuda_started(); // (before: see the function)
        check("cuInit", (api.driver.cu_init)(0))?;
        let mut device: CuDevice = 0;
        check(
            "cuDeviceGet",
            (api.driver.cu_device_get)(&mut device, index as c_int),
        )?;
        let (mut major, mut minor) = (0, 0);
        // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76
        check(
            "cuDeviceGetAttribute",
            (api.driver.cu_device_get_attribute)(&mut major, 75, device),
        )?;
        check(
            "cuDeviceGetAttribute",
            (api.driver.cu_device_get_attribute)(&mut minor, 76, device),
        )?;
        let mut context: CuContext = std::ptr::null_mut();
        check(
            "cuDevicePrimaryCtxRetain",
            (api.driver.cu_primary_ctx_retain)(&mut context, device),
        )?;
        check("cuCtxPushCurrent", (api.driver.cu_ctx_push)(context))?;
        // the device's own code first (nothing for the driver to compile: a driver older
        // than this NVRTC runs it), else PTX for the driver to compile
        let module_of = |image: &[u8]| -> std::result::Result<CuFunction, String> {
            let mut module: CuModule = std::ptr::null_mut();
            let mut function: CuFunction = std::ptr::null_mut();
            check(
                "cuModuleLoadData",
                (api.driver.cu_module_load_data)(&mut module, image.as_ptr().cast()),
            )?;
            check(
                "cuModuleGetFunction",
                (api.driver.cu_module_get_function)(&mut function, module, c"pert_noise".as_ptr()),
            )?;
            Ok(function)
        };
        let loaded = match api
            .nvrtc
            .cubin(SOURCE, major, minor)
            .and_then(|c| module_of(&c))
        {
            Ok(function) => Ok((function, format!("CUBIN sm_{major}{minor}"))),
            // PTX of the newest architecture NVRTC knows that the device runs (a device
            // newer than this NVRTC gets older PTX, which its driver compiles for it)
            Err(no_cubin) => match api.nvrtc.ptx_target(major, minor) {
                None => Err(format!(
                    "this NVRTC compiles for no architecture that sm_{major}{minor} runs (no CUBIN: {no_cubin})"
                )),
                Some((pm, pn)) => api
                    .nvrtc
                    .ptx(SOURCE, pm, pn)
                    .and_then(|p| module_of(&p))
                    .map(|f| (f, format!("PTX compute_{pm}{pn} (no CUBIN: {no_cubin})")))
                    .map_err(|why| format!("{why} (and no CUBIN: {no_cubin})")),
            },
        };
        let mut popped: CuContext = std::ptr::null_mut();
        (api.driver.cu_ctx_pop)(&mut popped);
        loaded.map(|(function, form)| Loaded {
            launcher: Launcher { context, function },
            form,
        })
    }
}

/// Why the kernel is unavailable when the driver API or NVRTC is missing.
const NO_API: &str = "no CUDA driver API or no NVRTC found";

/// The form of the kernel's code on CUDA device `index` (loading it there if need be), or
/// why it does not run there.
pub(crate) fn status(index: usize) -> std::result::Result<String, String> {
    let api = api().ok_or(NO_API)?;
    kernel(&api, index, |k| {
        k.as_ref().map(|l| l.form.clone()).map_err(Clone::clone)
    })
}

/// Elements `first .. first + count` of the noise of `stream` on CUDA device `device`
/// (Gumbel when `gumbel`, else Normal), made by the fused kernel on libtorch's current
/// stream; None when the kernel is unavailable, or cannot run in the CUDA context that
/// libtorch's memory or stream belongs to (the caller then uses libtorch operations).
pub(crate) fn sample(
    gumbel: bool,
    stream: &Stream,
    first: u64,
    count: usize,
    device: Device,
) -> Option<Result<Tensor>> {
    let Device::Cuda(index) = device else {
        return None;
    };
    let Some(api) = api() else {
        warn_fallback(NO_API);
        return None;
    };
    let launcher = kernel(&api, index, |k| match k {
        Ok(loaded) => Some(loaded.launcher),
        Err(why) => {
            warn_fallback(&format!("cuda:{index}: {why}"));
            None
        }
    })?;
    let out = match Tensor::f_empty([count as i64], (Kind::Float, device)) {
        Ok(out) => out,
        Err(e) => return Some(Err(e.into())),
    };
    if count == 0 {
        return Some(Ok(out));
    }
    // libtorch's current stream (None: its functions are not found, and the legacy
    // default stream is used, with device synchronizations around the kernel)
    let cuda_stream = match crate::cuda_stream::current(index) {
        Ok(s) => s,
        Err(e) => return Some(Err(e)),
    };
    if let Some(s) = cuda_stream {
        let memory = crate::cuda_stream::context_of_pointer(out.data_ptr() as u64);
        let of_stream = crate::cuda_stream::context_of_stream(s);
        if [memory, of_stream]
            .iter()
            .any(|c| c.is_some_and(|c| c != launcher.context))
        {
            warn_other_context(index);
            return None;
        }
    }
    let words = (stream.key(), stream.id());
    Some(
        launch(
            &api,
            launcher,
            cuda_stream,
            (&out, first, count),
            words,
            gumbel,
        )
        .map(|()| out),
    )
}

/// Says once per process, on stderr (unless PERTURBATIONS_QUIET), that libtorch's memory or
/// stream on a device belongs to a CUDA context other than the device's primary one (where
/// the kernel is loaded), so that device's noise takes libtorch's operations.
fn warn_other_context(index: usize) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) || quiet() {
        return;
    }
    eprintln!(
        "perturbations: libtorch's memory or current stream on cuda:{index} belongs to a CUDA \
         context other than the device's primary context (another library made its own \
         context current?); the fused noise kernel runs only in the primary context, so CUDA \
         noise there is drawn with libtorch operations: the same values, slower. \
         PERTURBATIONS_QUIET=1 silences this message."
    );
}

/// Enqueues the kernel writing elements `first .. first + count` of the noise of the
/// stream with `(key, id)` into `out` (a fresh float32 tensor of `count` elements on the
/// launcher's device, in its context), on `cuda_stream` (None: the legacy default stream,
/// with the device synchronized before and after).
fn launch(
    api: &Api,
    loaded: Launcher,
    cuda_stream: Option<crate::cuda_stream::CuStream>,
    (out, first, count): (&Tensor, u64, usize),
    (key, id): ([u32; 2], u64),
    gumbel: bool,
) -> Result<()> {
    let fail = |what: &str, code: CuResult| {
        Error::new(
            Status::TorchError,
            format!("the CUDA noise kernel failed: {what} returned CUDA error {code}"),
        )
    };
    let blocks = (first + count as u64).div_ceil(4) - first / 4;
    let grid = blocks
        .div_ceil(crate::tuning::CUDA_NOISE_THREADS)
        .clamp(1, 1 << 16) as c_uint;
    let mut out_ptr = out.data_ptr() as u64;
    let (mut first_arg, mut count_arg) = (first, count as u64);
    let (mut k0, mut k1) = (key[0], key[1]);
    let (mut s0, mut s1) = (id as u32, (id >> 32) as u32);
    let mut gumbel: c_int = gumbel.into();
    let mut params: [*mut c_void; 8] = [
        (&mut out_ptr as *mut u64).cast(),
        (&mut first_arg as *mut u64).cast(),
        (&mut count_arg as *mut u64).cast(),
        (&mut k0 as *mut u32).cast(),
        (&mut k1 as *mut u32).cast(),
        (&mut s0 as *mut u32).cast(),
        (&mut s1 as *mut u32).cast(),
        (&mut gumbel as *mut c_int).cast(),
    ];
    // SAFETY: the context is the device's primary context (libtorch's), pushed on this
    // thread for the calls and popped after; `out` is a fresh float32 device tensor of
    // `count` elements in that context (checked by the caller where the driver can tell),
    // which the kernel writes exactly. On libtorch's current stream the kernel is ordered
    // after the stream's earlier work (libtorch's allocator gave `out` for that stream)
    // and before libtorch's later work there, which reads `out`; on the legacy stream the
    // device is synchronized before and after it. The parameters match the kernel's
    // signature and outlive the launch call (which copies them).
    unsafe {
        let code = (api.driver.cu_ctx_push)(loaded.context);
        if code != 0 {
            return Err(fail("cuCtxPushCurrent", code));
        }
        let sync = || match (api.driver.cu_ctx_synchronize)() {
            0 => Ok(()),
            code => Err(fail("cuCtxSynchronize", code)),
        };
        let result = (|| {
            if cuda_stream.is_none() {
                sync()?;
            }
            let code = (api.driver.cu_launch_kernel)(
                loaded.function,
                grid,
                1,
                1,
                crate::tuning::CUDA_NOISE_THREADS as c_uint,
                1,
                1,
                0,
                cuda_stream.unwrap_or(std::ptr::null_mut()),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            );
            if code != 0 {
                return Err(fail("cuLaunchKernel", code));
            }
            if cuda_stream.is_none() {
                sync()?;
            }
            Ok(())
        })();
        let mut popped: CuContext = std::ptr::null_mut();
        (api.driver.cu_ctx_pop)(&mut popped);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_compiles_where_nvrtc_is_found() {
        // NVRTC needs no GPU: the pip wheel of torch ships it, so the source is checked
        // here; the kernel's values are checked on a GPU (tests/scale.rs, gpu-check.sh)
        let Some(nvrtc) = crate::nvrtc::nvrtc() else {
            eprintln!("no NVRTC beside this libtorch: the source is not compiled");
            return;
        };
        for (major, minor) in [(8, 0), (9, 0)] {
            let ptx = nvrtc.ptx(SOURCE, major, minor).unwrap();
            let text = String::from_utf8_lossy(&ptx);
            assert!(text.contains(".entry pert_noise"), "{text}");
            // and the device code itself, which the driver loads without compiling
            let cubin = nvrtc.cubin(SOURCE, major, minor).unwrap();
            assert!(cubin.starts_with(b"\x7fELF"), "{} bytes", cubin.len());
        }
        assert!(nvrtc.version().is_some_and(|v| v.contains('.')));
        // a device newer than this NVRTC: PTX of the newest architecture it knows (which
        // compiles), an older one: none below it
        let newest = nvrtc
            .ptx_target(99, 9)
            .expect("an architecture below sm_999");
        assert!(newest.0 >= 9, "{newest:?}");
        assert!(nvrtc.ptx(SOURCE, newest.0, newest.1).is_ok());
        assert_eq!(nvrtc.ptx_target(9, 0), Some((9, 0)));
        assert_eq!(crate::nvrtc::ptx_arch(&[75, 80, 90, 120], 122), Some(120));
        assert_eq!(crate::nvrtc::ptx_arch(&[75, 80, 90, 120], 89), Some(80));
        assert_eq!(crate::nvrtc::ptx_arch(&[75, 80], 70), None);
        assert_eq!(crate::nvrtc::ptx_arch(&[], 86), Some(86));
        assert!(nvrtc.folder().is_some_and(|f| f.is_dir()));
    }

    /// NVRTC that torch or the application loaded before the library looked for it (found
    /// by RTLD_NOLOAD) compiles the kernel too: its builtins library, which it opens by
    /// name from a folder on no search path, is loaded first from NVRTC's own folder. Run
    /// in a child process whose NVRTC is preloaded (LD_PRELOAD of the wheel's).
    #[test]
    fn the_kernel_compiles_with_an_nvrtc_loaded_before() {
        if std::env::var_os("PERT_TEST_NVRTC_PRELOADED").is_some() {
            let nvrtc = crate::nvrtc::nvrtc().expect("the preloaded NVRTC is found");
            nvrtc.ptx(SOURCE, 9, 0).unwrap();
            return;
        }
        let Some(folder) = crate::cuda_libraries::torch_lib_folder() else {
            return;
        };
        let wheel = folder.join("../../nvidia/cu13/lib/libnvrtc.so.13");
        if !wheel.exists() {
            eprintln!("no NVRTC in this torch wheel: not checked");
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "cuda_noise::tests::the_kernel_compiles_with_an_nvrtc_loaded_before",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env("LD_PRELOAD", &wheel)
            .env("PERT_TEST_NVRTC_PRELOADED", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("1 passed"),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
