//! The benchmark (`examples/bench`) still builds and runs: its `--quick`
//! pass over every workload, checked for a complete table. The figures are
//! not checked; targets are for BENCHMARKS.md, not for tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The longest the quick pass may take, debug build and busy machine
/// included.
const QUICK_PASS_LIMIT: Duration = Duration::from_secs(240);

/// `target/<profile>`, the directory this test binary was built into
/// (`target/<profile>/deps/bench_smoke-<hash>`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    exe.parent()
        .and_then(Path::parent)
        .expect("the test runs from target/<profile>/deps")
        .to_path_buf()
}

/// Build the bench example into this test's target directory (a no-op
/// when it is up to date) and return its path.
fn bench_binary() -> PathBuf {
    let profile_dir = profile_dir();
    let target_dir = profile_dir.parent().expect("a target directory");
    let mut build = Command::new(env!("CARGO"));
    build
        .args(["build", "--quiet", "--example", "bench", "--manifest-path"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", target_dir);
    if profile_dir
        .file_name()
        .is_some_and(|name| name == "release")
    {
        build.arg("--release");
    }
    let status = build.status().expect("cargo runs");
    assert!(status.success(), "cargo build --example bench failed");
    profile_dir.join("examples").join("bench")
}

#[test]
fn the_quick_benchmark_runs_every_workload_and_prints_its_table() {
    let mut child = Command::new(bench_binary())
        .arg("--quick")
        .env("DGBIT_BUS_BIN", env!("CARGO_BIN_EXE_dgbit-bus"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the bench starts");

    let deadline = Instant::now() + QUICK_PASS_LIMIT;
    while child.try_wait().expect("wait on the bench").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the quick pass took longer than {QUICK_PASS_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().expect("the bench's output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the bench failed:\n{stdout}\n{stderr}"
    );

    assert!(stdout.contains("| workload |"), "no table:\n{stdout}");
    for workload in ["| 1 ", "| 2 ", "| 3 ", "| 4 ", "| 5 ", "| 6 "] {
        assert!(
            stdout.contains(workload),
            "no row for workload `{workload}`:\n{stdout}"
        );
    }
    assert!(!stdout.contains("did not run"), "{stdout}");
}
