//! The `rtrain` command; everything it does lives in the `rtrain-launcher` library.

fn main() -> std::process::ExitCode {
    rtrain_launcher::cli::main()
}
