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
    #[error("socket error: {0}")]
    Socket(#[from] nng::Error),
}

/// Settings every edge applies to its socket.
#[derive(Debug, Clone)]
pub struct EdgeOptions {
    /// Largest body the bus answers with a decoded reply; see
    /// [`hard_receive_limit`] for what NNG itself enforces.
    pub max_message_size: usize,
    /// Mode bits for ipc socket files created by listeners.
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
/// Twice the logical limit: a body between the two gets a `too_large` reply or
/// dead letter naming its size, so a peer learns why; only a body beyond this
/// costs the peer its connection.
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
/// permission denied, tcp port in use).
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
        .start(true)
        .map_err(|(_, source)| dial_error(source))
}

/// The file system path of an `ipc://` URL.
pub fn ipc_path(url: &str) -> Option<PathBuf> {
    url.strip_prefix("ipc://")
        .filter(|path| !path.is_empty())
        .map(PathBuf::from)
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
    fn ipc_files_get_the_configured_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mode.ipc");
        let socket = Socket::new(Protocol::Rep0).unwrap();
        let options = EdgeOptions {
            ipc_permissions: 0o600,
            ..EdgeOptions::default()
        };
        listen(&socket, &format!("ipc://{}", path.display()), &options).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_listener_in_a_missing_directory_fails_with_the_url() {
        let url = "ipc:///nonexistent-dgbit-dir/x.ipc";
        let socket = Socket::new(Protocol::Rep0).unwrap();
        let err = listen(&socket, url, &EdgeOptions::default()).unwrap_err();
        assert!(err.to_string().contains(url), "{err}");
    }
}
