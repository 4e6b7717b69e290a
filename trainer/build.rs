//! Compiles `csrc/torch_extras.cpp`, the libtorch calls tch does not offer, against the same
//! libtorch headers torch-sys uses (its `links = "tch"` metadata names the library folder).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/torch_extras.cpp");
    for var in ["LIBTORCH_CXX11_ABI", "LIBTORCH_INCLUDE"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        panic!("torch-sys did not name its libtorch folder (DEP_TCH_LIBTORCH_LIB); run scripts/setup-libtorch.sh");
    };
    // As torch-sys finds them for a LIBTORCH install: `LIBTORCH_INCLUDE` or the install's root
    // (the library folder's parent), and the C++11 ABI unless `LIBTORCH_CXX11_ABI=0`.
    // (`LIBTORCH_USE_PYTORCH`, where torch-sys asks Python, is not supported here.)
    let root = std::env::var_os("LIBTORCH_INCLUDE").map_or_else(|| PathBuf::from(lib).join(".."), PathBuf::from);
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("csrc/torch_extras.cpp")
        .compile("rtrain_torch_extras");
}
