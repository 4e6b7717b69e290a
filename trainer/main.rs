//! The `rtrain-worker` command: built-in workers, role programs and the `rtrain` commands that
//! need libtorch (`rtrain` executes it for them); everything it does lives in the libraries.

fn main() -> std::process::ExitCode {
    rtrain_trainer::cli::main_with(rtrain_rl::programs::extensions())
}
