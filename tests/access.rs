//! Access control at the edges: who may connect to the bus's ipc sockets.
//!
//! A peer connects to an ipc socket only with write permission on the
//! socket file and search permission on every directory above it. The bus
//! creates its files with mode 0o660 (its user and group), configurable
//! with `serve --ipc-mode`, and creates a missing directory for them with
//! mode 0o750 (`serve --ipc-dir-mode`).
//!
//! The tests that switch users need root and print a `SKIPPED` line without
//! it (or fail when `DGBIT_REQUIRE_ROOT=1` says they must run). The other
//! user is `nobody`, run through `setpriv` (util-linux) or `runuser`.

mod common;

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use dgbit_bus::config::Addresses;

use common::{bus_binary, wait_until, ServeProcess};

/// Write a line straight to the test's stderr, so a skip is never hidden
/// by libtest's capture of passing tests.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

fn skip(test: &str, reason: &str) {
    if std::env::var_os("DGBIT_REQUIRE_ROOT").is_some_and(|v| v != "0" && !v.is_empty()) {
        panic!("{test} cannot run but DGBIT_REQUIRE_ROOT is set: {reason}");
    }
    say(&format!("SKIPPED {test}: {reason}"));
}

fn effective_uid_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("Uid:"))
                .and_then(|line| line.split_whitespace().nth(2).map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}

/// How to run a program as another user and group.
#[derive(Clone, Copy)]
enum Switch {
    Setpriv,
    Runuser,
}

/// Another user to try the sockets as: `nobody`, in its own group or in
/// the bus's (root's) group.
#[derive(Clone)]
struct Stranger {
    switch: Switch,
    user: String,
    group: String,
    /// The dgbit-bus binary at a path this user may execute.
    binary: PathBuf,
}

impl Stranger {
    /// `nobody` in `nobody`'s own group, if this machine can switch to it.
    ///
    /// # Errors
    ///
    /// Why not, for the SKIPPED line.
    fn nobody(scratch: &Path) -> Result<Stranger, String> {
        if !effective_uid_is_root() {
            return Err("not root: running a client as another user needs root".into());
        }
        let switch = if Command::new("setpriv").arg("--version").output().is_ok() {
            Switch::Setpriv
        } else if Command::new("runuser").arg("--version").output().is_ok() {
            Switch::Runuser
        } else {
            return Err("neither setpriv nor runuser (util-linux) is installed".into());
        };
        let id = |flag: &str| {
            Command::new("id")
                .args([flag, "nobody"])
                .output()
                .ok()
                .filter(|out| out.status.success())
                .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
                .ok_or_else(|| "there is no user `nobody`".to_string())
        };
        let mut stranger = Stranger {
            switch,
            user: id("-un")?,
            group: id("-gn")?,
            binary: bus_binary(),
        };
        if !stranger.can_run_the_binary() {
            // The build directory may be closed to other users: use a copy.
            let copy = scratch.join("dgbit-bus");
            std::fs::copy(bus_binary(), &copy).map_err(|err| err.to_string())?;
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))
                .map_err(|err| err.to_string())?;
            stranger.binary = copy;
            if !stranger.can_run_the_binary() {
                return Err(format!("user {} cannot run dgbit-bus", stranger.user));
            }
        }
        Ok(stranger)
    }

    /// The same user in `group`.
    fn in_group(&self, group: &str) -> Stranger {
        Stranger {
            group: group.into(),
            ..self.clone()
        }
    }

    fn command(&self) -> Command {
        let mut command = match self.switch {
            Switch::Setpriv => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={}", self.user))
                    .arg(format!("--regid={}", self.group))
                    .arg("--clear-groups");
                c
            }
            Switch::Runuser => {
                let mut c = Command::new("runuser");
                c.args(["-u", &self.user, "-g", &self.group, "--"]);
                c
            }
        };
        command.arg(&self.binary).env("RUST_LOG", "error");
        command
    }

    fn can_run_the_binary(&self) -> bool {
        self.command()
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }

    /// `dgbit-bus send ping` to `url` as this user.
    fn ping(&self, url: &str) -> Output {
        ping_with(self.command(), url)
    }
}

/// `dgbit-bus send ping` to `url` through `command` (the binary, with or
/// without a user switch in front), within a time limit.
fn ping_with(mut command: Command, url: &str) -> Output {
    let mut child = command
        .args(["--command-address", url, "send", "ping", "--timeout-s", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("dgbit-bus send starts");
    let done = wait_until(Duration::from_secs(30), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !done {
        let _ = child.kill();
    }
    child.wait_with_output().expect("dgbit-bus send output")
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn sockets(addresses: &Addresses) -> [(&'static str, &str); 4] {
    [
        ("command", &addresses.command),
        ("event", &addresses.event),
        ("job queue", &addresses.job_queue),
        ("data", &addresses.data),
    ]
}

fn ipc_file(url: &str) -> PathBuf {
    PathBuf::from(url.strip_prefix("ipc://").expect("an ipc url"))
}

/// A temp dir anyone may enter, so that the socket files' own mode is the
/// only thing between another user and the bus.
fn open_scratch_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[test]
fn another_user_cannot_connect_to_the_ipc_sockets_with_the_default_mode() {
    const TEST: &str = "another_user_cannot_connect_to_the_ipc_sockets_with_the_default_mode";
    let dir = open_scratch_dir();
    let nobody = match Stranger::nobody(dir.path()) {
        Ok(nobody) => nobody,
        Err(reason) => return skip(TEST, &reason),
    };
    let addresses = Addresses::in_dir(dir.path());
    let _bus = ServeProcess::start(&addresses, &["--dead-letter-path", ":memory:"]);

    for (socket, url) in sockets(&addresses) {
        let meta = std::fs::metadata(ipc_file(url)).unwrap();
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o660,
            "{socket} socket file"
        );
        assert_eq!(meta.uid(), 0, "{socket} socket file is the bus user's");

        // Another user, in another group: refused by the file's mode.
        let refused = nobody.ping(url);
        assert!(
            !refused.status.success(),
            "nobody reached the {socket} socket"
        );
        assert!(
            stderr_of(&refused).contains("Permission denied"),
            "{socket}: {}",
            stderr_of(&refused)
        );
    }

    // A member of the bus's group gets through: the command and data
    // buses answer, and the PUB and PUSH sockets are reached (the
    // connection is made, then refused as the wrong protocol).
    let member = nobody.in_group("root");
    for (socket, url) in sockets(&addresses) {
        let output = member.ping(url);
        let stderr = stderr_of(&output);
        assert!(!stderr.contains("Permission denied"), "{socket}: {stderr}");
        if matches!(socket, "command" | "data") {
            assert!(output.status.success(), "{socket}: {stderr}");
        }
    }
    // And the owner, of course.
    assert!(ping_with(Command::new(bus_binary()), &addresses.command)
        .status
        .success());
}

#[test]
fn the_ipc_mode_flag_sets_who_may_connect() {
    const TEST: &str = "the_ipc_mode_flag_sets_who_may_connect";
    let dir = open_scratch_dir();
    let nobody = match Stranger::nobody(dir.path()) {
        Ok(nobody) => nobody,
        Err(reason) => return skip(TEST, &reason),
    };
    let addresses = Addresses::in_dir(dir.path());
    let bus = ServeProcess::start(
        &addresses,
        &["--dead-letter-path", ":memory:", "--ipc-mode", "600"],
    );
    let mode = std::fs::metadata(ipc_file(&addresses.command))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let member = nobody.in_group("root");
    let refused = member.ping(&addresses.command);
    assert!(
        stderr_of(&refused).contains("Permission denied"),
        "owner only: {}",
        stderr_of(&refused)
    );
    drop(bus);

    let _open = ServeProcess::start(
        &addresses,
        &["--dead-letter-path", ":memory:", "--ipc-mode", "0o666"],
    );
    let allowed = nobody.ping(&addresses.command);
    assert!(allowed.status.success(), "666: {}", stderr_of(&allowed));
}

#[test]
fn serve_creates_a_missing_ipc_directory_closed_to_other_users() {
    const TEST: &str = "serve_creates_a_missing_ipc_directory_closed_to_other_users";
    let dir = open_scratch_dir();
    let run = dir.path().join("run");
    let addresses = Addresses::in_dir(&run);
    // Even with socket files anyone could write, the directory keeps
    // strangers out.
    let _bus = ServeProcess::start(
        &addresses,
        &["--dead-letter-path", ":memory:", "--ipc-mode", "666"],
    );
    let mode = std::fs::metadata(&run).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o750, "the bus's ipc directory");

    let nobody = match Stranger::nobody(dir.path()) {
        Ok(nobody) => nobody,
        Err(reason) => return skip(TEST, &reason),
    };
    let refused = nobody.ping(&addresses.command);
    assert!(
        stderr_of(&refused).contains("Permission denied"),
        "{}",
        stderr_of(&refused)
    );
    let member = nobody.in_group("root");
    assert!(member.ping(&addresses.command).status.success());
}
