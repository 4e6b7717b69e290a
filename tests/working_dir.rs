//! `job.working_dir`: relative paths of a config resolve against it (by default the config
//! file's folder), whatever directory `rtrain launch` runs in, and the job's processes run there.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(180);

/// `rtrain ARGS` run in `cwd` to its end.
fn run_in(cwd: &Path, args: &[&str]) -> Output {
    wait_output(spawn_in(cwd, args), LIMIT)
}

#[test]
fn relative_paths_resolve_from_the_config_folder_wherever_the_launch_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (job, elsewhere) = (dir.path().join("job"), dir.path().join("elsewhere"));
    std::fs::create_dir_all(job.join("data")).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    let corpus = "the cat sat on the mat. ".repeat(200);
    std::fs::write(job.join("data/corpus.txt"), &corpus).unwrap();
    let text =
        tiny_gpt("wd", Path::new("out"), 1, 1, 3).replace("synthetic_bytes = 20000", "source = \"data/corpus.txt\"");
    write_config(&job, "job.toml", &text);

    let out = run_in(&elsewhere, &["launch", "../job/job.toml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = job.join("out/wd");
    assert_eq!(summary(&run)["status"], "finished");
    assert!(!elsewhere.join("out").exists(), "nothing lands in the launch's directory");
    // The run's copy of the config, which its workers read, names the same files.
    let kept = std::fs::read_to_string(run.join("config.toml")).unwrap();
    let source = job.join("data/corpus.txt").canonicalize().unwrap();
    assert!(kept.contains(&format!("source = \"{}\"", source.display())), "{kept}");
    // The same config launched from its own folder continues the same run.
    let again = run_in(&job, &["launch", "job.toml"]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(stderr(&again).contains("already finished") || stderr(&again).contains("step 3"), "{}", stderr(&again));
}

#[test]
fn the_job_runs_in_its_working_dir_and_a_missing_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job");
    std::fs::create_dir_all(job.join("work")).unwrap();
    let text = r#"
[job]
name = "cwd"
run_dir = "runs"
working_dir = "work"
entrypoint = ["sh", "-c", "pwd > where.txt"]

[train]
workers = 1
steps = 1
"#;
    write_config(&job, "job.toml", text);
    let out = run_in(dir.path(), &["launch", "job/job.toml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let work = job.join("work").canonicalize().unwrap();
    assert_eq!(std::fs::read_to_string(work.join("where.txt")).unwrap().trim(), work.to_str().unwrap());
    assert!(work.join("runs/cwd/summary.json").exists(), "run_dir is relative to working_dir");

    write_config(&job, "bad.toml", &text.replace("\"work\"", "\"missing\""));
    let out = run_in(dir.path(), &["validate", "job/bad.toml"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("job.working_dir") && err.contains("missing is not a directory"), "{err}");
}
