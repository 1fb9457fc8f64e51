//! The dead letter queue: jobs that ran out of retries and messages that
//! could not be parsed, kept durably so that nothing is lost.
//!
//! [`DeadLetterActor`] owns a [`DeadLetterStore`], a SQLite database opened
//! through rusqlite (bundled SQLite) in WAL mode with `synchronous=FULL`.
//! Every write is committed before the actor replies, so an entry that was
//! acknowledged survives a SIGKILL of the process (and a power cut, thanks to
//! `FULL`). A store opened with no path lives in memory and dies with the
//! process. SQLite work runs on tokio's blocking pool, never on the actor's
//! thread.
//!
//! # Entries
//!
//! On the wire (and in `bus.dlq.show`) an entry is a JSON object:
//!
//! | key | holds |
//! |---|---|
//! | `id` | a UUID naming the entry |
//! | `original_job` | the job as dgbit's 7-key object (with the last `retry_count`), any other JSON that arrived, or `null` |
//! | `error` | why it is here, readable |
//! | `timestamp` | when it was buried, RFC 3339 UTC |
//! | `source` | who buried it: `job_queue`, or the socket an unparseable message came from |
//! | `attempts` | the attempt history: one object per attempt with `attempt`, `worker`, `started_at`, `ended_at`, `outcome` (`failed` or `lease_expired`) and `error` |
//! | `raw_hex` | only for unparseable messages: the exact bytes received, as lower-case hex, two digits per byte |
//!
//! Hex was chosen over base64 because it needs no extra dependency and any
//! tool reads it (`bytes.fromhex` in Python, `xxd -r -p` in a shell).
//!
//! # Limits
//!
//! [`DeadLetterLimits`] bounds the store by entry count and by age. After each
//! insert (and once a minute) the oldest entries past either limit are
//! deleted in the same transaction; evictions are counted in the stats and
//! logged at `warn`.
//!
//! # Commands
//!
//! The actor serves these `bus.*` commands (registered by the bus):
//!
//! - `bus.dlq.list` `{"offset"?: 0, "limit"?: 50}` (limit at most 1000):
//!   `{"total", "offset", "limit", "entries": [summary...]}`, oldest first;
//!   a summary has `id`, `timestamp`, `source`, `job_id`, `job_type`,
//!   `error`, `attempts` (a count) and `has_raw`.
//! - `bus.dlq.show` `{"id"}`: the whole entry; `not_found` if absent.
//! - `bus.dlq.replay` `{"id"}` or `{"all": true}`: each entry's job goes back
//!   into the queue with `retry_count` 0 and the same `job_id`; the entry is
//!   deleted only after the queue accepted the job. Reply
//!   `{"replayed": [ids], "failed": [{"id", "error"}]}`. Entries without a
//!   valid job (raw messages) cannot be replayed and are reported as failed.
//! - `bus.dlq.purge` `{"id"}` or `{"all": true}`: `{"purged": n}`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tracing::{debug, error, warn};

use crate::dispatcher::Enqueue;
use crate::message::{optional_u64, Command, HandlerError, StatsQuery};
use crate::wire::{code, now_rfc3339, JobMessage};

/// The command names the dead letter actor serves; the bus routes each of
/// them to the actor's `Recipient<Command>`.
pub const DEAD_LETTER_COMMANDS: [&str; 4] = [
    "bus.dlq.list",
    "bus.dlq.show",
    "bus.dlq.replay",
    "bus.dlq.purge",
];

/// The most entries one `bus.dlq.list` page returns.
pub const MAX_LIST_PAGE: usize = 1000;

/// How often the actor evicts entries past the age limit.
const AGE_EVICTION_INTERVAL: Duration = Duration::from_secs(60);

/// One dead letter. See the module docs for the wire form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// A UUID naming the entry.
    pub id: String,
    /// The job (dgbit's 7 keys), other JSON that arrived, or null.
    pub original_job: Value,
    /// Why the entry is here.
    pub error: String,
    /// When it was buried, RFC 3339 UTC.
    pub timestamp: String,
    /// Who buried it: `job_queue` or a socket name.
    #[serde(default)]
    pub source: String,
    /// One object per attempt: `attempt`, `worker`, `started_at`, `ended_at`,
    /// `outcome`, `error`.
    #[serde(default)]
    pub attempts: Vec<Value>,
    /// The bytes of a message that could not be parsed, exactly as received.
    #[serde(
        default,
        rename = "raw_hex",
        with = "hex_bytes",
        skip_serializing_if = "Option::is_none"
    )]
    pub raw: Option<Vec<u8>>,
}

impl DeadLetter {
    /// An entry for a job that will not be retried.
    pub fn for_job(
        job: &JobMessage,
        error: impl Into<String>,
        source: impl Into<String>,
        attempts: Vec<Value>,
    ) -> Self {
        Self {
            id: uuid::Uuid::new_v4().to_string(),
            original_job: job.to_value(),
            error: error.into(),
            timestamp: now_rfc3339(),
            source: source.into(),
            attempts,
            raw: None,
        }
    }

    /// An entry for a message from `source` (a socket name) that could not be
    /// used. The bytes are kept as they are; when they are JSON after all,
    /// `original_job` holds that JSON too.
    pub fn unparseable(source: impl Into<String>, raw: &[u8], error: impl Into<String>) -> Self {
        let original_job = serde_json::from_slice::<Value>(raw).unwrap_or(Value::Null);
        Self {
            id: uuid::Uuid::new_v4().to_string(),
            original_job,
            error: error.into(),
            timestamp: now_rfc3339(),
            source: source.into(),
            attempts: Vec::new(),
            raw: Some(raw.to_vec()),
        }
    }

    /// The entry as its wire JSON object.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).expect("a DeadLetter always serialises")
    }

    /// Read an entry from its wire JSON object.
    ///
    /// # Errors
    ///
    /// [`DeadLetterError::Corrupt`] when a key is missing or mistyped, or
    /// `raw_hex` is not hex.
    pub fn from_value(value: Value) -> Result<Self, DeadLetterError> {
        serde_json::from_value(value).map_err(|err| DeadLetterError::Corrupt(err.to_string()))
    }

    fn job_field(&self, key: &str) -> Option<&str> {
        self.original_job.get(key).and_then(Value::as_str)
    }
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(bytes) => s.serialize_str(&super::to_hex(bytes)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(text) => super::from_hex(&text)
                .map(Some)
                .ok_or_else(|| serde::de::Error::custom("`raw_hex` is not hex")),
        }
    }
}

/// Lower-case hex, two digits per byte.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(DIGITS[(byte >> 4) as usize] as char);
        text.push(DIGITS[(byte & 0xf) as usize] as char);
    }
    text
}

/// The bytes of a hex string (either case); `None` if it is not hex.
pub fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    text.as_bytes()
        .chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// How much the store keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadLetterLimits {
    /// The most entries kept; the oldest go first. Default 100 000.
    pub max_entries: usize,
    /// The oldest an entry may get; `None` keeps entries forever.
    /// Default 30 days.
    pub max_age: Option<Duration>,
}

impl Default for DeadLetterLimits {
    fn default() -> Self {
        Self {
            max_entries: 100_000,
            max_age: Some(Duration::from_secs(30 * 24 * 3600)),
        }
    }
}

/// Why the dead letter store failed.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// The database file could not be opened or set up.
    #[error("cannot open the dead letter store {path}: {source}")]
    Open {
        /// The file, or `:memory:`.
        path: String,
        /// SQLite's reason.
        source: rusqlite::Error,
    },
    /// A read or write failed.
    #[error("dead letter store: {0}")]
    Store(#[from] rusqlite::Error),
    /// A stored entry could not be read back.
    #[error("dead letter entry is corrupt: {0}")]
    Corrupt(String),
    /// The blocking task running the store was lost (runtime shutting down).
    #[error("the dead letter store is unavailable")]
    Unavailable,
}

/// A summary row of `bus.dlq.list`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetterSummary {
    /// The entry's id.
    pub id: String,
    /// When it was buried.
    pub timestamp: String,
    /// Who buried it.
    pub source: String,
    /// The job's id, when the entry holds a job.
    pub job_id: Option<String>,
    /// The job's type, when the entry holds a job.
    pub job_type: Option<String>,
    /// Why it is here.
    pub error: String,
    /// How many attempts its history records.
    pub attempts: usize,
    /// Whether it keeps raw bytes.
    pub has_raw: bool,
}

/// The SQLite store behind [`DeadLetterActor`]; usable on its own (tools,
/// tests). All methods block on SQLite.
pub struct DeadLetterStore {
    conn: Connection,
    limits: DeadLetterLimits,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS dead_letters (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    stored_at_ms INTEGER NOT NULL,
    job_id       TEXT,
    job_type     TEXT,
    source       TEXT NOT NULL,
    error        TEXT NOT NULL,
    timestamp    TEXT NOT NULL,
    entry        TEXT NOT NULL,
    raw          BLOB
);";

impl DeadLetterStore {
    /// Open (or create) the store at `path`; `None` for an in-memory store.
    /// Entries past the limits are evicted at once.
    ///
    /// # Errors
    ///
    /// [`DeadLetterError::Open`] when the file cannot be opened or is not a
    /// SQLite database, or the schema cannot be created.
    pub fn open(path: Option<&Path>, limits: DeadLetterLimits) -> Result<Self, DeadLetterError> {
        let name = path.map_or_else(|| ":memory:".to_string(), |p| p.display().to_string());
        let open_error = |source| DeadLetterError::Open {
            path: name.clone(),
            source,
        };
        let conn = match path {
            Some(path) => Connection::open(path),
            None => Connection::open_in_memory(),
        }
        .map_err(open_error)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(open_error)?;
        // journal_mode answers with a row, so it is queried, not executed.
        let _mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |row| row.get(0))
            .map_err(open_error)?;
        conn.execute_batch("PRAGMA synchronous=FULL;")
            .map_err(open_error)?;
        conn.execute_batch(SCHEMA).map_err(open_error)?;
        let mut store = Self { conn, limits };
        store.evict(SystemTime::now())?;
        Ok(store)
    }

    /// Store `entry` (replacing one with the same id) and evict past the
    /// limits, in one committed transaction. Returns how many were evicted.
    ///
    /// # Errors
    ///
    /// [`DeadLetterError::Store`] when SQLite fails; nothing is written then.
    pub fn insert(&mut self, entry: &DeadLetter) -> Result<u64, DeadLetterError> {
        let body = DeadLetter {
            raw: None,
            ..entry.clone()
        };
        let body = serde_json::to_string(&body).expect("a DeadLetter always serialises");
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT OR REPLACE INTO dead_letters
               (id, stored_at_ms, job_id, job_type, source, error, timestamp, entry, raw)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                entry.id,
                unix_ms(SystemTime::now()),
                entry.job_field("job_id"),
                entry.job_field("job_type"),
                entry.source,
                entry.error,
                entry.timestamp,
                body,
                entry.raw,
            ],
        )?;
        let evicted = evict_in(&tx, &self.limits, SystemTime::now())?;
        tx.commit()?;
        Ok(evicted)
    }

    /// Delete entries past the age and count limits as of `now`.
    ///
    /// # Errors
    ///
    /// [`DeadLetterError::Store`] when SQLite fails.
    pub fn evict(&mut self, now: SystemTime) -> Result<u64, DeadLetterError> {
        let tx = self.conn.transaction()?;
        let evicted = evict_in(&tx, &self.limits, now)?;
        tx.commit()?;
        if evicted > 0 {
            warn!(evicted, "dead letters evicted past the store's limits");
        }
        Ok(evicted)
    }

    /// How many entries are stored.
    ///
    /// # Errors
    ///
    /// [`DeadLetterError::Store`] when SQLite fails.
    pub fn len(&self) -> Result<u64, DeadLetterError> {
        Ok(self
            .conn
            .query_row("SELECT COUNT(*) FROM dead_letters", [], |row| row.get(0))?)
    }

    /// Whether the store is empty.
    ///
    /// # Errors
    ///
    /// [`DeadLetterError::Store`] when SQLite fails.
    pub fn is_empty(&self) -> Result<bool, DeadLetterError> {
        Ok(self.len()? == 0)
    }

    /// A page of summaries, oldest first.
    ///
    /// # Errors
    ///
    /// [`DeadLetterError::Store`] when SQLite fails; `Corrupt` for an entry
    /// that cannot be read back.
    pub fn list(
        &self,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<DeadLetterSummary>, DeadLetterError> {
        let mut statement = self.conn.prepare(
            "SELECT id, timestamp, source, job_id, job_type, error, entry, raw IS NOT NULL
             FROM dead_letters ORDER BY seq LIMIT ?1 OFFSET ?2",
        )?;
        let rows = statement.query_map(params![limit as i64, offset as i64], |row| {
            let entry: String = row.get(6)?;
            Ok((
                DeadLetterSummary {
                    id: row.get(0)?,
                    timestamp: row.get(1)?,
                    source: row.get(2)?,
                    job_id: row.get(3)?,
                    job_type: row.get(4)?,
                    error: row.get(5)?,
                    attempts: 0,
                    has_raw: row.get(7)?,
                },
                entry,
            ))
        })?;
        let mut page = Vec::new();
        for row in rows {
            let (mut summary, entry) = row?;
            let entry: Value = serde_json::from_str(&entry)
                .map_err(|err| DeadLetterError::Corrupt(err.to_string()))?;
            summary.attempts = entry
                .get("attempts")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            page.push(summary);
        }
        Ok(page)
    }

    /// The entry `id`, if stored.
    ///
    /// # Errors
    ///
    /// [`DeadLetterError::Store`] when SQLite fails; `Corrupt` for an entry
    /// that cannot be read back.
    pub fn get(&self, id: &str) -> Result<Option<DeadLetter>, DeadLetterError> {
        let row = self
            .conn
            .query_row(
                "SELECT entry, raw FROM dead_letters WHERE id = ?1",
                params![id],
                |row| Ok((row.get::<_, String>(0)?, row.get::<_, Option<Vec<u8>>>(1)?)),
            )
            .optional()?;
        let Some((entry, raw)) = row else {
            return Ok(None);
        };
        let value: Value = serde_json::from_str(&entry)
            .map_err(|err| DeadLetterError::Corrupt(err.to_string()))?;
        let mut letter = DeadLetter::from_value(value)?;
        letter.raw = raw;
        Ok(Some(letter))
    }

    /// The ids of all entries, oldest first.
    ///
    /// # Errors
    ///
    /// [`DeadLetterError::Store`] when SQLite fails.
    pub fn ids(&self) -> Result<Vec<String>, DeadLetterError> {
        let mut statement = self
            .conn
            .prepare("SELECT id FROM dead_letters ORDER BY seq")?;
        let ids = statement
            .query_map([], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(ids)
    }

    /// Delete the entry `id`; returns whether it was there.
    ///
    /// # Errors
    ///
    /// [`DeadLetterError::Store`] when SQLite fails.
    pub fn remove(&mut self, id: &str) -> Result<bool, DeadLetterError> {
        Ok(self
            .conn
            .execute("DELETE FROM dead_letters WHERE id = ?1", params![id])?
            > 0)
    }

    /// Delete every entry; returns how many there were.
    ///
    /// # Errors
    ///
    /// [`DeadLetterError::Store`] when SQLite fails.
    pub fn purge_all(&mut self) -> Result<u64, DeadLetterError> {
        Ok(self.conn.execute("DELETE FROM dead_letters", [])? as u64)
    }
}

fn evict_in(
    conn: &Connection,
    limits: &DeadLetterLimits,
    now: SystemTime,
) -> Result<u64, DeadLetterError> {
    let mut evicted = 0;
    if let Some(max_age) = limits.max_age {
        let cutoff = unix_ms(now.checked_sub(max_age).unwrap_or(UNIX_EPOCH));
        evicted += conn.execute(
            "DELETE FROM dead_letters WHERE stored_at_ms < ?1",
            params![cutoff],
        )?;
    }
    evicted += conn.execute(
        "DELETE FROM dead_letters WHERE seq IN (
           SELECT seq FROM dead_letters ORDER BY seq
           LIMIT MAX(0, (SELECT COUNT(*) FROM dead_letters) - ?1))",
        params![limits.max_entries as i64],
    )?;
    Ok(evicted as u64)
}

fn unix_ms(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Store `entry` in the dead letter queue. The reply comes after the entry
/// is committed.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(), DeadLetterError>")]
pub struct Bury {
    /// The entry to store.
    pub entry: DeadLetter,
}

/// Where `bus.dlq.replay` sends jobs back: the dispatcher.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct SetReplayTarget {
    /// Where replayed jobs go.
    pub target: Recipient<Enqueue>,
}

#[derive(Debug, Default)]
struct Counters {
    entries: AtomicU64,
    buried: AtomicU64,
    bury_failures: AtomicU64,
    evicted: AtomicU64,
    replayed: AtomicU64,
    purged: AtomicU64,
}

type SharedStore = Arc<Mutex<DeadLetterStore>>;

/// The dead letter queue's actor; see the module docs.
///
/// # Restarts
///
/// The store, the counters and the replay target are shared by every
/// instance made with [`DeadLetterActor::instance`], so a supervisor's
/// factory builds a new instance without reopening the file:
/// `move || first.instance()`.
///
/// # Cancellation
///
/// Each write runs to completion on the blocking pool even when the caller
/// stops waiting, so an entry is either committed or not written at all.
pub struct DeadLetterActor {
    store: SharedStore,
    counters: Arc<Counters>,
    replay_target: Arc<Mutex<Option<Recipient<Enqueue>>>>,
}

impl DeadLetterActor {
    /// Open the store at `path` (`None`: in memory).
    ///
    /// # Errors
    ///
    /// As [`DeadLetterStore::open`].
    pub fn open(path: Option<PathBuf>, limits: DeadLetterLimits) -> Result<Self, DeadLetterError> {
        let store = DeadLetterStore::open(path.as_deref(), limits)?;
        let counters = Counters::default();
        counters.entries.store(store.len()?, Ordering::Relaxed);
        Ok(Self {
            store: Arc::new(Mutex::new(store)),
            counters: Arc::new(counters),
            replay_target: Arc::default(),
        })
    }

    /// Another instance over the same store, counters and replay target.
    pub fn instance(&self) -> Self {
        Self {
            store: self.store.clone(),
            counters: self.counters.clone(),
            replay_target: self.replay_target.clone(),
        }
    }

    fn stats(&self) -> Value {
        let c = &self.counters;
        json!({
            "entries": c.entries.load(Ordering::Relaxed),
            "buried": c.buried.load(Ordering::Relaxed),
            "bury_failures": c.bury_failures.load(Ordering::Relaxed),
            "evicted": c.evicted.load(Ordering::Relaxed),
            "replayed": c.replayed.load(Ordering::Relaxed),
            "purged": c.purged.load(Ordering::Relaxed),
        })
    }
}

/// Run `work` on the store on tokio's blocking pool.
async fn with_store<T: Send + 'static>(
    store: SharedStore,
    work: impl FnOnce(&mut DeadLetterStore) -> Result<T, DeadLetterError> + Send + 'static,
) -> Result<T, DeadLetterError> {
    tokio::task::spawn_blocking(move || {
        let mut store = store.lock().unwrap_or_else(PoisonError::into_inner);
        work(&mut store)
    })
    .await
    .map_err(|_| DeadLetterError::Unavailable)?
}

/// Refresh the entry count after a change.
async fn recount(store: &SharedStore, counters: &Counters) {
    if let Ok(len) = with_store(store.clone(), |store| store.len()).await {
        counters.entries.store(len, Ordering::Relaxed);
    }
}

impl Actor for DeadLetterActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(AGE_EVICTION_INTERVAL, |actor, _| {
            let (store, counters) = (actor.store.clone(), actor.counters.clone());
            actix::spawn(async move {
                match with_store(store.clone(), |s| s.evict(SystemTime::now())).await {
                    Ok(evicted) => {
                        counters.evicted.fetch_add(evicted, Ordering::Relaxed);
                        recount(&store, &counters).await;
                    }
                    Err(err) => warn!(error = %err, "dead letter eviction failed"),
                }
            });
        });
    }
}

crate::impl_inject_fault!(DeadLetterActor);

impl Handler<Bury> for DeadLetterActor {
    type Result = ResponseFuture<Result<(), DeadLetterError>>;

    fn handle(&mut self, msg: Bury, _: &mut Self::Context) -> Self::Result {
        let (store, counters) = (self.store.clone(), self.counters.clone());
        Box::pin(async move {
            let id = msg.entry.id.clone();
            match with_store(store.clone(), move |s| s.insert(&msg.entry)).await {
                Ok(evicted) => {
                    counters.buried.fetch_add(1, Ordering::Relaxed);
                    if evicted > 0 {
                        counters.evicted.fetch_add(evicted, Ordering::Relaxed);
                        warn!(evicted, "dead letters evicted past the store's limits");
                    }
                    recount(&store, &counters).await;
                    debug!(id, "dead letter stored");
                    Ok(())
                }
                Err(err) => {
                    counters.bury_failures.fetch_add(1, Ordering::Relaxed);
                    error!(id, error = %err, "dead letter could not be stored");
                    Err(err)
                }
            }
        })
    }
}

impl Handler<SetReplayTarget> for DeadLetterActor {
    type Result = ();

    fn handle(&mut self, msg: SetReplayTarget, _: &mut Self::Context) {
        *self
            .replay_target
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(msg.target);
    }
}

impl Handler<StatsQuery> for DeadLetterActor {
    type Result = MessageResult<StatsQuery>;

    fn handle(&mut self, _: StatsQuery, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.stats())
    }
}

impl Handler<Command> for DeadLetterActor {
    type Result = ResponseFuture<Result<Value, HandlerError>>;

    fn handle(&mut self, msg: Command, _: &mut Self::Context) -> Self::Result {
        let (store, counters) = (self.store.clone(), self.counters.clone());
        let payload = msg.request.payload;
        match msg.name.as_str() {
            "bus.dlq.list" => Box::pin(list(store, payload)),
            "bus.dlq.show" => Box::pin(show(store, payload)),
            "bus.dlq.replay" => {
                let target = self
                    .replay_target
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                Box::pin(replay(store, counters, target, payload))
            }
            "bus.dlq.purge" => Box::pin(purge(store, counters, payload)),
            other => {
                let error = HandlerError::new(
                    code::UNKNOWN_COMMAND,
                    format!("the dead letter queue does not serve `{other}`"),
                );
                Box::pin(async move { Err(error) })
            }
        }
    }
}

fn store_failed(err: DeadLetterError) -> HandlerError {
    HandlerError::failed(err.to_string())
}

fn page_arg(
    payload: &Map<String, Value>,
    key: &str,
    default: usize,
) -> Result<usize, HandlerError> {
    Ok(optional_u64(payload, key)?.map_or(default, |n| n as usize))
}

/// The target of `show`, `replay` and `purge`: one id, or all.
enum Target {
    One(String),
    All,
}

fn target_arg(payload: &Map<String, Value>) -> Result<Target, HandlerError> {
    if payload.get("all").and_then(Value::as_bool) == Some(true) {
        return Ok(Target::All);
    }
    match payload.get("id").and_then(Value::as_str) {
        Some(id) if !id.is_empty() => Ok(Target::One(id.to_string())),
        _ => Err(HandlerError::bad_request(
            "give `id` (a dead letter id) or `all`: true",
        )),
    }
}

async fn list(store: SharedStore, payload: Map<String, Value>) -> Result<Value, HandlerError> {
    let offset = page_arg(&payload, "offset", 0)?;
    let limit = page_arg(&payload, "limit", 50)?.min(MAX_LIST_PAGE);
    let (total, entries) = with_store(store, move |s| Ok((s.len()?, s.list(offset, limit)?)))
        .await
        .map_err(store_failed)?;
    Ok(json!({"total": total, "offset": offset, "limit": limit, "entries": entries}))
}

async fn show(store: SharedStore, payload: Map<String, Value>) -> Result<Value, HandlerError> {
    let Target::One(id) = target_arg(&payload)? else {
        return Err(HandlerError::bad_request("`bus.dlq.show` takes one `id`"));
    };
    let lookup = id.clone();
    match with_store(store, move |s| s.get(&lookup))
        .await
        .map_err(store_failed)?
    {
        Some(entry) => Ok(entry.to_value()),
        None => Err(not_found(&id)),
    }
}

fn not_found(id: &str) -> HandlerError {
    HandlerError::new(code::NOT_FOUND, format!("no dead letter {id}"))
}

async fn replay(
    store: SharedStore,
    counters: Arc<Counters>,
    target: Option<Recipient<Enqueue>>,
    payload: Map<String, Value>,
) -> Result<Value, HandlerError> {
    let target = target.ok_or_else(|| HandlerError::failed("no job queue to replay into"))?;
    let (ids, single) = match target_arg(&payload)? {
        Target::All => {
            let ids = with_store(store.clone(), |s| s.ids())
                .await
                .map_err(store_failed)?;
            (ids, false)
        }
        Target::One(id) => (vec![id], true),
    };

    let mut replayed = Vec::new();
    let mut failed = Vec::new();
    for id in ids {
        match replay_one(&store, &target, &id).await {
            Ok(()) => replayed.push(Value::String(id)),
            Err(err) if single && err.code == code::NOT_FOUND => return Err(err),
            Err(err) => failed.push(json!({"id": id, "error": err.message})),
        }
    }
    counters
        .replayed
        .fetch_add(replayed.len() as u64, Ordering::Relaxed);
    recount(&store, &counters).await;
    Ok(json!({"replayed": replayed, "failed": failed}))
}

/// Enqueue the job of entry `id` afresh, then delete the entry: a crash in
/// between leaves the entry in place (replayed twice at worst, never lost).
async fn replay_one(
    store: &SharedStore,
    target: &Recipient<Enqueue>,
    id: &str,
) -> Result<(), HandlerError> {
    let lookup = id.to_string();
    let entry = with_store(store.clone(), move |s| s.get(&lookup))
        .await
        .map_err(store_failed)?
        .ok_or_else(|| not_found(id))?;
    let mut job = JobMessage::from_value(entry.original_job)
        .map_err(|err| HandlerError::bad_request(format!("entry has no job to replay: {err}")))?;
    job.retry_count = 0;

    match target.send(Enqueue { job }).await {
        Ok(Ok(_)) => {}
        Ok(Err(err)) => return Err(err),
        Err(err) => {
            return Err(HandlerError::failed(format!(
                "the job queue is unavailable: {err}"
            )))
        }
    }
    let remove = id.to_string();
    with_store(store.clone(), move |s| s.remove(&remove))
        .await
        .map_err(store_failed)?;
    Ok(())
}

async fn purge(
    store: SharedStore,
    counters: Arc<Counters>,
    payload: Map<String, Value>,
) -> Result<Value, HandlerError> {
    let purged = match target_arg(&payload)? {
        Target::All => with_store(store.clone(), |s| s.purge_all())
            .await
            .map_err(store_failed)?,
        Target::One(id) => {
            let remove = id.clone();
            if !with_store(store.clone(), move |s| s.remove(&remove))
                .await
                .map_err(store_failed)?
            {
                return Err(not_found(&id));
            }
            1
        }
    };
    counters.purged.fetch_add(purged, Ordering::Relaxed);
    recount(&store, &counters).await;
    Ok(json!({"purged": purged}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::JobMessage;

    fn letter(job_type: &str) -> DeadLetter {
        let job = JobMessage::new(job_type, json!({"n": 1}));
        DeadLetter::for_job(
            &job,
            "gave up",
            "job_queue",
            vec![json!({"outcome": "failed"})],
        )
    }

    #[test]
    fn hex_round_trips_every_byte() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(from_hex(&to_hex(&bytes)).unwrap(), bytes);
        assert_eq!(to_hex(b"\x00\xff"), "00ff");
        assert_eq!(from_hex("0g"), None);
        assert_eq!(from_hex("abc"), None);
    }

    #[test]
    fn an_unparseable_message_keeps_its_exact_bytes() {
        let raw = b"\xff\xfe not json \x00";
        let entry = DeadLetter::unparseable("command", raw, "message is not UTF-8");
        let value = entry.to_value();
        assert_eq!(value["original_job"], Value::Null);
        assert_eq!(value["raw_hex"], json!(to_hex(raw)));
        for key in ["original_job", "error", "timestamp"] {
            assert!(value.get(key).is_some(), "the seed's key {key} is kept");
        }
        assert_eq!(DeadLetter::from_value(value).unwrap(), entry);
    }

    #[test]
    fn an_entry_survives_reopening_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dlq.sqlite");
        let entry = letter("fetch");
        let raw = DeadLetter::unparseable("job_queue", b"\x01\x02", "bad");
        {
            let mut store =
                DeadLetterStore::open(Some(&path), DeadLetterLimits::default()).unwrap();
            store.insert(&entry).unwrap();
            store.insert(&raw).unwrap();
        }
        let store = DeadLetterStore::open(Some(&path), DeadLetterLimits::default()).unwrap();
        assert_eq!(store.len().unwrap(), 2);
        assert_eq!(store.get(&entry.id).unwrap().unwrap(), entry);
        assert_eq!(
            store.get(&raw.id).unwrap().unwrap().raw.unwrap(),
            b"\x01\x02"
        );
        let page = store.list(0, 10).unwrap();
        assert_eq!(page[0].job_type.as_deref(), Some("fetch"));
        assert_eq!(page[0].attempts, 1);
        assert!(page[1].has_raw);
    }

    #[test]
    fn the_oldest_entries_go_first_past_the_count_limit() {
        let limits = DeadLetterLimits {
            max_entries: 3,
            max_age: None,
        };
        let mut store = DeadLetterStore::open(None, limits).unwrap();
        let entries: Vec<DeadLetter> = (0..5).map(|_| letter("t")).collect();
        let evicted: u64 = entries.iter().map(|e| store.insert(e).unwrap()).sum();
        assert_eq!(evicted, 2);
        let kept: Vec<String> = entries[2..].iter().map(|e| e.id.clone()).collect();
        assert_eq!(store.ids().unwrap(), kept);
    }

    #[test]
    fn entries_past_the_age_limit_are_evicted() {
        let limits = DeadLetterLimits {
            max_entries: 100,
            max_age: Some(Duration::from_secs(60)),
        };
        let mut store = DeadLetterStore::open(None, limits).unwrap();
        store.insert(&letter("t")).unwrap();
        assert_eq!(store.evict(SystemTime::now()).unwrap(), 0);
        let later = SystemTime::now() + Duration::from_secs(61);
        assert_eq!(store.evict(later).unwrap(), 1);
        assert!(store.is_empty().unwrap());
    }

    /// Accepts jobs only when told to, recording what it accepted.
    struct FakeQueue {
        accept: bool,
        accepted: Vec<JobMessage>,
    }

    impl Actor for FakeQueue {
        type Context = Context<Self>;
    }

    impl Handler<Enqueue> for FakeQueue {
        type Result = Result<String, HandlerError>;

        fn handle(&mut self, msg: Enqueue, _: &mut Self::Context) -> Self::Result {
            if !self.accept {
                return Err(HandlerError::new(code::OVERLOADED, "full"));
            }
            self.accepted.push(msg.job.clone());
            Ok(msg.job.job_id)
        }
    }

    #[derive(Message)]
    #[rtype(result = "Vec<JobMessage>")]
    struct Accepted;

    impl FakeQueue {
        fn start_accepting(accept: bool) -> Addr<FakeQueue> {
            FakeQueue {
                accept,
                accepted: vec![],
            }
            .start()
        }
    }

    /// Store `entry`, which must succeed.
    async fn bury(actor: &Addr<DeadLetterActor>, entry: DeadLetter) {
        actor.send(Bury { entry }).await.unwrap().unwrap();
    }

    impl Handler<Accepted> for FakeQueue {
        type Result = MessageResult<Accepted>;

        fn handle(&mut self, _: Accepted, _: &mut Self::Context) -> Self::Result {
            MessageResult(self.accepted.clone())
        }
    }

    async fn command(
        actor: &Addr<DeadLetterActor>,
        name: &str,
        payload: Value,
    ) -> Result<Value, HandlerError> {
        actor.send(Command::new(name, payload)).await.unwrap()
    }

    #[actix_rt::test]
    async fn a_replayed_entry_leaves_only_after_the_queue_took_its_job() {
        let actor = DeadLetterActor::open(None, DeadLetterLimits::default())
            .unwrap()
            .start();
        let mut entry = letter("fetch");
        entry.original_job["retry_count"] = json!(3);
        bury(&actor, entry.clone()).await;

        let refusing = FakeQueue::start_accepting(false);
        actor
            .send(SetReplayTarget {
                target: refusing.recipient(),
            })
            .await
            .unwrap();
        let reply = command(&actor, "bus.dlq.replay", json!({"all": true}))
            .await
            .unwrap();
        assert_eq!(reply["failed"][0]["id"], json!(entry.id));
        assert!(
            command(&actor, "bus.dlq.show", json!({"id": entry.id}))
                .await
                .is_ok(),
            "kept"
        );

        let accepting = FakeQueue::start_accepting(true);
        actor
            .send(SetReplayTarget {
                target: accepting.clone().recipient(),
            })
            .await
            .unwrap();
        let reply = command(&actor, "bus.dlq.replay", json!({"id": entry.id}))
            .await
            .unwrap();
        assert_eq!(reply["replayed"], json!([entry.id]));
        let jobs = accepting.send(Accepted).await.unwrap();
        assert_eq!(
            jobs[0].job_id,
            entry.original_job["job_id"].as_str().unwrap()
        );
        assert_eq!(jobs[0].retry_count, 0, "a fresh attempt count");
        let gone = command(&actor, "bus.dlq.show", json!({"id": entry.id}))
            .await
            .unwrap_err();
        assert_eq!(gone.code, code::NOT_FOUND);
        assert_eq!(actor.send(StatsQuery).await.unwrap()["replayed"], json!(1));
    }

    #[actix_rt::test]
    async fn a_new_instance_shares_the_store_and_the_replay_target() {
        let first = DeadLetterActor::open(None, DeadLetterLimits::default()).unwrap();
        let factory = move || first.instance();
        let one = factory().start();
        bury(&one, letter("t")).await;
        let queue = FakeQueue::start_accepting(true);
        one.send(SetReplayTarget {
            target: queue.clone().recipient(),
        })
        .await
        .unwrap();
        drop(one);

        let two = factory().start();
        assert_eq!(two.send(StatsQuery).await.unwrap()["entries"], json!(1));
        let reply = command(&two, "bus.dlq.replay", json!({"all": true}))
            .await
            .unwrap();
        assert_eq!(reply["replayed"].as_array().unwrap().len(), 1);
        assert_eq!(queue.send(Accepted).await.unwrap().len(), 1);
    }

    #[actix_rt::test]
    async fn purge_removes_one_entry_or_all_and_list_pages_through_them() {
        let actor = DeadLetterActor::open(None, DeadLetterLimits::default())
            .unwrap()
            .start();
        let entries: Vec<DeadLetter> = (0..5).map(|_| letter("t")).collect();
        for entry in &entries {
            bury(&actor, entry.clone()).await;
        }
        let page = command(&actor, "bus.dlq.list", json!({"offset": 1, "limit": 2}))
            .await
            .unwrap();
        assert_eq!(page["total"], json!(5));
        assert_eq!(page["entries"][0]["id"], json!(entries[1].id));
        assert_eq!(page["entries"].as_array().unwrap().len(), 2);

        let one = command(&actor, "bus.dlq.purge", json!({"id": entries[0].id}))
            .await
            .unwrap();
        assert_eq!(one["purged"], json!(1));
        let missing = command(&actor, "bus.dlq.purge", json!({"id": entries[0].id})).await;
        assert_eq!(missing.unwrap_err().code, code::NOT_FOUND);
        let all = command(&actor, "bus.dlq.purge", json!({"all": true}))
            .await
            .unwrap();
        assert_eq!(all["purged"], json!(4));
        assert_eq!(actor.send(StatsQuery).await.unwrap()["entries"], json!(0));
    }
}
