// trl_like's build script: libtorch link settings (see link.rs) and the c10d
// shim (csrc/c10d_shim.cpp), the C interface to libtorch's process groups that
// `trl_like::distributed` calls; and the autograd ops (csrc/ops.cpp) that
// `trl_like::ops` calls.
include!("link.rs");

use std::path::{Path, PathBuf};

fn main() {
    link_libtorch();
    build_c10d_shim();
    build_ops();
}

/// The first directory among `candidates` that holds `probe`.
fn find_dir(candidates: &[PathBuf], probe: &str) -> Option<PathBuf> {
    candidates.iter().find(|d| d.join(probe).exists()).cloned()
}

fn build_c10d_shim() {
    println!("cargo:rerun-if-changed=csrc/c10d_shim.cpp");
    for var in [
        "TRL_LIKE_GLOO_INCLUDE",
        "TRL_LIKE_CUDA_INCLUDE",
        "TRL_LIKE_NO_NCCL",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let lib_dir = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys reports where libtorch is (DEP_TCH_LIBTORCH_LIB)");
    // .../torch/lib -> .../torch/include (pip wheels and the standalone libtorch zip alike).
    let torch_include = Path::new(&lib_dir)
        .parent()
        .expect("libtorch lib dir has a parent")
        .join("include");

    // libtorch carries ProcessGroupGloo but not gloo's own headers; `make setup`
    // unpacks Debian's libgloo-dev (headers only are used; gloo itself is inside libtorch).
    let mut gloo_candidates: Vec<PathBuf> = std::env::var_os("TRL_LIKE_GLOO_INCLUDE")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    gloo_candidates.push(manifest.join("../.venv/gloo/usr/include"));
    gloo_candidates.push(PathBuf::from("/usr/include"));
    let Some(gloo_include) = find_dir(&gloo_candidates, "gloo/context.h") else {
        panic!(
            "gloo headers not found (looked in {:?}). `make setup` unpacks them into .venv/gloo; \
             or install Debian's libgloo-dev, or set TRL_LIKE_GLOO_INCLUDE",
            gloo_candidates
        );
    };

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .file("csrc/c10d_shim.cpp")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None)
        .include(&torch_include)
        .include(torch_include.join("torch/csrc/api/include"))
        .include(&gloo_include)
        // libtorch's headers are not warning-clean; the shim's own code is small.
        .warnings(false)
        .flag_if_supported("-Wno-deprecated-declarations");

    // NCCL when the CUDA runtime, its crt / cccl headers and nccl.h are all at hand
    // (the CUDA wheels `make setup` installs); otherwise the shim says so at run time.
    let site = Path::new(&lib_dir).join("../..");
    let cuda_include = std::env::var_os("TRL_LIKE_CUDA_INCLUDE")
        .map(PathBuf::from)
        .unwrap_or_else(|| site.join("nvidia/cu13/include"));
    let nccl_include = site.join("nvidia/nccl/include");
    let with_nccl = std::env::var_os("TRL_LIKE_NO_NCCL").is_none()
        && Path::new(&lib_dir).join("libtorch_cuda.so").exists()
        && cuda_include.join("cuda_runtime_api.h").exists()
        && cuda_include.join("crt/host_defines.h").exists()
        && cuda_include.join("cccl").is_dir()
        && nccl_include.join("nccl.h").exists();
    if with_nccl {
        build
            .define("USE_C10D_NCCL", None)
            .define("USE_CUDA", None)
            .define("TRL_C10D_WITH_NCCL", None)
            .include(&cuda_include)
            .include(cuda_include.join("cccl"))
            .include(&nccl_include);
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
    build.compile("trl_c10d");
    println!("cargo:rustc-link-search=native={lib_dir}");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}

/// csrc/ops.cpp: the fused LM-head loss everywhere; its CUDA parts (flash
/// attention over a padding-free row, allocator statistics) when the CUDA
/// runtime headers are at hand (the CUDA wheels `make setup` installs).
/// Without them the ops answer "not available" at run time.
fn build_ops() {
    println!("cargo:rerun-if-changed=csrc/ops.cpp");
    println!("cargo:rerun-if-env-changed=TRL_LIKE_NO_CUDA_OPS");
    let lib_dir = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys reports where libtorch is (DEP_TCH_LIBTORCH_LIB)");
    let torch_include = Path::new(&lib_dir)
        .parent()
        .expect("libtorch lib dir has a parent")
        .join("include");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .file("csrc/ops.cpp")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .include(&torch_include)
        .include(torch_include.join("torch/csrc/api/include"))
        .warnings(false)
        .flag_if_supported("-Wno-deprecated-declarations");
    let site = Path::new(&lib_dir).join("../..");
    let cuda_include = std::env::var_os("TRL_LIKE_CUDA_INCLUDE")
        .map(PathBuf::from)
        .unwrap_or_else(|| site.join("nvidia/cu13/include"));
    let with_cuda = std::env::var_os("TRL_LIKE_NO_CUDA_OPS").is_none()
        && Path::new(&lib_dir).join("libc10_cuda.so").exists()
        && cuda_include.join("cuda_runtime_api.h").exists()
        && cuda_include.join("crt/host_defines.h").exists()
        && cuda_include.join("cccl").is_dir();
    if with_cuda {
        build
            .define("TRL_OPS_WITH_CUDA", None)
            .define("USE_CUDA", None)
            .include(&cuda_include)
            .include(cuda_include.join("cccl"));
    }
    build.compile("trl_ops");
    if with_cuda {
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
    println!("cargo:rustc-link-search=native={lib_dir}");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}
