//! Compiles `csrc/torch_extras.cpp`, the libtorch calls tch does not offer, against the same
//! libtorch headers torch-sys uses (its `links = "tch"` metadata names the library folder).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/torch_extras.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        panic!("torch-sys did not name its libtorch folder (DEP_TCH_LIBTORCH_LIB); run scripts/setup-libtorch.sh");
    };
    let root = PathBuf::from(lib).join("..");
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
