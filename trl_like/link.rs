// Link settings shared by every crate of the workspace that links libtorch
// (both build scripts `include!` this file).
//
// - `--no-as-needed -ltorch_cuda`: the linker's default `--as-needed` drops
//   libtorch_cuda.so because no symbol of it is referenced directly, and CUDA
//   then reads as unavailable at run time (tch-rs issue #907). Keeping it costs
//   nothing on CPU-only machines: the library loads and finds no device.
// - an rpath to the libtorch the build used, so binaries and tests run
//   without LD_LIBRARY_PATH.
fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
        if std::path::Path::new(&lib_dir)
            .join("libtorch_cuda.so")
            .exists()
        {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
}
