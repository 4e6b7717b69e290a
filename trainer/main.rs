//! The `rtrain-worker` command: built-in workers and the `rtrain` commands that need libtorch
//! (`rtrain` executes it for them); everything it does lives in the `rtrain-trainer` library.

fn main() -> std::process::ExitCode {
    rtrain_trainer::cli::main()
}
