//! The NNG edges: the only code that owns sockets.
//!
//! Each edge owns one nng socket, turns wire bytes into typed messages for its
//! role actor and back. Listening and dialing go through [`listen`] and
//! [`dial`] here, so that every socket gets the same size limit, ipc file
//! handling and reconnect schedule.
//!
//! - [`rep`]: `RepEdge`, the REP side of the command and data buses.
//! - [`publish`]: `PubEdge`, the PUB side of the event bus.
//! - [`subscribe`]: `SubEdge`, a remote subscriber that dials a bus.
//! - [`push`]: `PushEdge`, the PUSH side of the job queue.

pub mod listener;
pub mod publish;
pub mod push;
pub mod rep;
pub mod subscribe;

use std::path::{Path, PathBuf};
use std::time::Duration;

use nng::options::{Options, ReconnectMaxTime, ReconnectMinTime, RecvMaxSize};
use nng::{Dialer, DialerBuilder, Listener, ListenerBuilder, Socket};
use tracing::{debug, warn};

/// Why an edge could not open or went away.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("cannot listen on {url}: {source}")]
    Listen { url: String, source: nng::Error },
    #[error("cannot dial {url}: {source}")]
    Dial { url: String, source: nng::Error },
    #[error("{url} is in use by a live process")]
    InUse { url: String },
    #[error("cannot set the mode of {url}: {source}")]
    Permissions { url: String, source: std::io::Error },
    #[error("socket error: {0}")]
    Socket(#[from] nng::Error),
}

impl EdgeError {
    /// NNG's error behind this one, for callers that speak NNG's errors.
    pub fn nng_error(&self) -> Option<nng::Error> {
        match self {
            EdgeError::Listen { source, .. } | EdgeError::Dial { source, .. } => Some(*source),
            EdgeError::Socket(source) => Some(*source),
            EdgeError::InUse { .. } | EdgeError::Permissions { .. } => None,
        }
    }
}

/// Settings every edge applies to its socket.
#[derive(Debug, Clone)]
pub struct EdgeOptions {
    /// Largest body the bus answers with a decoded reply; see
    /// [`hard_receive_limit`] for what NNG itself enforces.
    pub max_message_size: usize,
    /// Mode bits for ipc socket files created by listeners, set exactly
    /// (the process umask does not narrow them).
    pub ipc_permissions: u32,
    /// Dialer reconnect schedule: NNG waits `reconnect_min`, doubling up to
    /// `reconnect_max`, between attempts.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

impl Default for EdgeOptions {
    fn default() -> Self {
        Self {
            max_message_size: 8 * 1024 * 1024,
            ipc_permissions: 0o660,
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
        }
    }
}

/// The size past which NNG drops a message before the bus sees it.
///
/// Twice the logical limit: a body between the two gets a `too_large` reply
/// naming its size, so a peer learns why; only a body beyond this costs the
/// peer its connection.
pub fn hard_receive_limit(max_message_size: usize) -> usize {
    max_message_size.saturating_mul(2).max(64 * 1024)
}

/// Room NNG's receive maximum leaves for protocol headers, which it counts
/// with the body: a REQ/REP message carries a 4-byte request id per hop, and
/// NNG allows at most 8 hops.
const PROTOCOL_HEADER_ROOM: usize = 64;

/// The value for NNG's receive maximum that lets bodies up to
/// [`hard_receive_limit`] through.
pub fn nng_receive_max(max_message_size: usize) -> usize {
    hard_receive_limit(max_message_size).saturating_add(PROTOCOL_HEADER_ROOM)
}

/// Listen on `url` with the edge options applied.
///
/// An ipc file left by a crashed process is removed first; a file that a live
/// process is listening on is never taken over.
///
/// # Errors
///
/// [`EdgeError::InUse`] when a live process holds the ipc path;
/// [`EdgeError::Listen`] when NNG refuses (bad URL, directory missing,
/// permission denied, tcp port in use); [`EdgeError::Permissions`] when the
/// ipc file's mode cannot be set (the listener is closed again).
pub fn listen(socket: &Socket, url: &str, options: &EdgeOptions) -> Result<Listener, EdgeError> {
    socket.set_opt::<RecvMaxSize>(nng_receive_max(options.max_message_size))?;
    if let Some(path) = ipc_path(url) {
        clear_stale_ipc_file(url, &path)?;
    }
    let listen_error = |source| EdgeError::Listen {
        url: url.to_string(),
        source,
    };
    let builder = ListenerBuilder::new(socket, url).map_err(listen_error)?;
    if ipc_path(url).is_some() {
        builder
            .set_opt::<nng::options::transport::ipc::Permissions>(options.ipc_permissions)
            .map_err(listen_error)?;
    }
    let listener = builder
        .start()
        .map_err(|(_, source)| listen_error(source))?;
    if let Some(path) = ipc_path(url) {
        // On Linux NNG sets the mode on the socket before binding it, and
        // the kernel then takes the umask away from it (0o660 becomes 0o640
        // under umask 022, shutting the group out). Setting it again on the
        // file makes it exact; until then it is only ever narrower.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::Permissions::from_mode(options.ipc_permissions);
        if let Err(source) = std::fs::set_permissions(&path, mode) {
            listener.close();
            return Err(EdgeError::Permissions {
                url: url.to_string(),
                source,
            });
        }
    }
    debug!(url, "listening");
    Ok(listener)
}

/// Dial `url` without waiting for the peer: NNG keeps reconnecting in the
/// background on the options' schedule.
///
/// # Errors
///
/// [`EdgeError::Dial`] when the URL is malformed or its transport unknown.
pub fn dial(socket: &Socket, url: &str, options: &EdgeOptions) -> Result<Dialer, EdgeError> {
    dial_with(socket, url, options, true)
}

/// As [`dial`]; with `nonblocking` false the first connection is made
/// before this returns, and a peer that is not there is an error.
///
/// # Errors
///
/// As [`dial`], plus [`EdgeError::Dial`] for a first connection that
/// failed.
pub fn dial_with(
    socket: &Socket,
    url: &str,
    options: &EdgeOptions,
    nonblocking: bool,
) -> Result<Dialer, EdgeError> {
    socket.set_opt::<RecvMaxSize>(nng_receive_max(options.max_message_size))?;
    let dial_error = |source| EdgeError::Dial {
        url: url.to_string(),
        source,
    };
    let builder = DialerBuilder::new(socket, url).map_err(dial_error)?;
    builder
        .set_opt::<ReconnectMinTime>(Some(options.reconnect_min))
        .map_err(dial_error)?;
    builder
        .set_opt::<ReconnectMaxTime>(Some(options.reconnect_max))
        .map_err(dial_error)?;
    builder
        .start(nonblocking)
        .map_err(|(_, source)| dial_error(source))
}

/// The file system path of an `ipc://` URL.
pub fn ipc_path(url: &str) -> Option<PathBuf> {
    url.strip_prefix("ipc://")
        .filter(|path| !path.is_empty())
        .map(PathBuf::from)
}

/// Whether listening on `url` would accept connections on every network
/// interface: a tcp or websocket URL whose host is empty, `*`, or an
/// unspecified address (`0.0.0.0` in any spelling NNG's resolver accepts,
/// `::`). ipc and inproc URLs never are.
pub fn is_wildcard_listen(url: &str) -> bool {
    let Some((scheme, rest)) = url.split_once("://") else {
        return false;
    };
    let network = ["tcp", "ws", "wss", "tls+tcp"].iter().any(|base| {
        scheme
            .strip_prefix(base)
            .is_some_and(|v| ["", "4", "6"].contains(&v))
    });
    if !network {
        return false;
    }
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        None => authority
            .rsplit_once(':')
            .map_or(authority, |(host, _port)| host),
    };
    is_unspecified_host(host)
}

fn is_unspecified_host(host: &str) -> bool {
    if host.is_empty() || host == "*" {
        return true;
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(v4)) => v4.is_unspecified(),
        Ok(std::net::IpAddr::V6(v6)) => {
            v6.is_unspecified() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_unspecified())
        }
        // The C resolver also reads `0`, `0.0`, `0x0` and `000` as 0.0.0.0.
        Err(_) => host.split('.').count() <= 4 && host.split('.').all(is_zero_number),
    }
}

fn is_zero_number(part: &str) -> bool {
    let digits = part
        .strip_prefix("0x")
        .or_else(|| part.strip_prefix("0X"))
        .unwrap_or(part);
    !part.is_empty() && digits.chars().all(|c| c == '0')
}

/// Create the directory holding the ipc file of `url` with `mode`, when it
/// is missing, so that the socket file is reachable only through a
/// directory the bus owns. Only the last component is created; an existing
/// directory is left as it is (it belongs to someone else). Returns the
/// directory when it was created.
///
/// # Errors
///
/// When the directory cannot be created or its mode set (its own parent
/// is missing, permission denied).
pub fn create_ipc_dir(url: &str, mode: u32) -> std::io::Result<Option<PathBuf>> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let Some(dir) = ipc_path(url).and_then(|path| path.parent().map(Path::to_path_buf)) else {
        return Ok(None);
    };
    if dir.as_os_str().is_empty() || dir.exists() {
        return Ok(None);
    }
    match std::fs::DirBuilder::new().mode(mode).create(&dir) {
        Ok(()) => {}
        // Another edge of the same bus made it first.
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => return Ok(None),
        Err(err) => return Err(err),
    }
    // The umask may have taken bits away; the mode asked for is exact.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))?;
    debug!(dir = %dir.display(), mode = format!("{mode:o}"), "created ipc directory");
    Ok(Some(dir))
}

/// Remove the ipc file at `path` if nothing answers on it.
fn clear_stale_ipc_file(url: &str, path: &Path) -> Result<(), EdgeError> {
    if !path.exists() {
        return Ok(());
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(EdgeError::InUse {
            url: url.to_string(),
        }),
        Err(_) => {
            warn!(path = %path.display(), "removing stale ipc socket file");
            let _ = std::fs::remove_file(path);
            Ok(())
        }
    }
}

/// Remove the ipc file of `url` on close, if it is still there.
///
/// Called by an edge after it closed its own listener, so the file is ours.
pub fn remove_ipc_file(url: &str) {
    if let Some(path) = ipc_path(url) {
        if std::fs::remove_file(&path).is_ok() {
            debug!(path = %path.display(), "removed ipc socket file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nng::Protocol;

    #[test]
    fn a_stale_ipc_file_does_not_stop_a_new_listener() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stale.ipc");
        std::fs::write(&path, b"").unwrap();
        let url = format!("ipc://{}", path.display());
        let socket = Socket::new(Protocol::Rep0).unwrap();
        listen(&socket, &url, &EdgeOptions::default()).unwrap();
    }

    #[test]
    fn a_live_ipc_listener_is_never_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("ipc://{}", dir.path().join("live.ipc").display());
        let first = Socket::new(Protocol::Rep0).unwrap();
        listen(&first, &url, &EdgeOptions::default()).unwrap();
        let second = Socket::new(Protocol::Rep0).unwrap();
        let err = listen(&second, &url, &EdgeOptions::default()).unwrap_err();
        assert!(matches!(err, EdgeError::InUse { .. }), "{err}");
    }

    #[test]
    fn ipc_files_get_the_configured_mode_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // The default and a mode no usual umask (022, 027, 077) leaves
        // alone, so a umask taken off would show.
        for mode in [0o600, 0o660, 0o666] {
            let path = dir.path().join(format!("{mode:o}.ipc"));
            let socket = Socket::new(Protocol::Rep0).unwrap();
            let options = EdgeOptions {
                ipc_permissions: mode,
                ..EdgeOptions::default()
            };
            listen(&socket, &format!("ipc://{}", path.display()), &options).unwrap();
            let actual = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(actual, mode, "{:o} became {:o}", mode, actual);
        }
    }

    #[test]
    fn wildcard_hosts_are_recognised_in_every_spelling() {
        for url in [
            "tcp://0.0.0.0:5555",
            "tcp://*:5555",
            "tcp://:5555",
            "tcp://[::]:5555",
            "tcp6://[::]:5555",
            "tcp4://0:5555",
            "tcp://0.0:5555",
            "tcp://0x0:5555",
            "tcp://[::ffff:0.0.0.0]:5555",
            "ws://*:8080/bus",
            "tls+tcp://0.0.0.0:443",
        ] {
            assert!(is_wildcard_listen(url), "{url}");
        }
        for url in [
            "tcp://127.0.0.1:5555",
            "tcp://10.77.0.1:5555",
            "tcp://[::1]:5555",
            "tcp://localhost:5555",
            "tcp://bus.internal:5555",
            "ws://10.0.0.1:8080/bus",
            "ipc:///tmp/dgbit_cmd.ipc",
            "ipc://*",
            "inproc://0.0.0.0",
        ] {
            assert!(!is_wildcard_listen(url), "{url}");
        }
    }

    #[test]
    fn a_missing_ipc_directory_is_created_with_the_mode_asked_for() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let url = format!("ipc://{}", dir.path().join("run/cmd.ipc").display());
        let created = create_ipc_dir(&url, 0o750).unwrap();
        assert_eq!(created.as_deref(), Some(dir.path().join("run").as_path()));
        let mode = std::fs::metadata(dir.path().join("run"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o750);
        assert_eq!(
            create_ipc_dir(&url, 0o700).unwrap(),
            None,
            "an existing one is kept"
        );
        let deep = format!("ipc://{}", dir.path().join("a/b/cmd.ipc").display());
        assert!(
            create_ipc_dir(&deep, 0o750).is_err(),
            "only the last component"
        );
        assert_eq!(create_ipc_dir("tcp://127.0.0.1:1", 0o750).unwrap(), None);
    }

    #[test]
    fn a_listener_in_a_missing_directory_fails_with_the_url() {
        let url = "ipc:///nonexistent-dgbit-dir/x.ipc";
        let socket = Socket::new(Protocol::Rep0).unwrap();
        let err = listen(&socket, url, &EdgeOptions::default()).unwrap_err();
        assert!(err.to_string().contains(url), "{err}");
    }
}
