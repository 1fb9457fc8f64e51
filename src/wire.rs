//! The wire codec: dgbit's JSON message shapes as typed Rust values.
//!
//! Only the edges and this module see bytes. Every decoder checks, in this
//! order: empty body, size limit, UTF-8, JSON syntax (serde_json's recursion
//! limit, [`MAX_NESTING`] levels, turns deep nesting into an error, not a stack
//! overflow), object shape, then the type of each known field. Each failure is
//! a [`WireError`] with a machine code that goes straight into an error reply
//! or a dead letter.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;

/// Machine codes carried in the `code` field of an error reply.
pub mod code {
    pub const BAD_REQUEST: &str = "bad_request";
    pub const UNKNOWN_COMMAND: &str = "unknown_command";
    pub const HANDLER_FAILED: &str = "handler_failed";
    pub const TIMEOUT: &str = "timeout";
    pub const OVERLOADED: &str = "overloaded";
    pub const TOO_LARGE: &str = "too_large";
    pub const SHUTTING_DOWN: &str = "shutting_down";
    pub const NOT_FOUND: &str = "not_found";

    /// Every code the bus itself answers with.
    pub const ALL: [&str; 8] = [
        BAD_REQUEST,
        UNKNOWN_COMMAND,
        HANDLER_FAILED,
        TIMEOUT,
        OVERLOADED,
        TOO_LARGE,
        SHUTTING_DOWN,
        NOT_FOUND,
    ];
}

/// Why a body could not be decoded, with the reply code it maps to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct WireError {
    /// One of [`code`].
    pub code: &'static str,
    /// Readable text for the `error` field.
    pub message: String,
}

impl WireError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            code: code::BAD_REQUEST,
            message: message.into(),
        }
    }
}

/// Parse `bytes` as one JSON object, enforcing `max_size` (0 = no limit).
///
/// # Errors
///
/// `too_large` when the body exceeds `max_size`; `bad_request` when it is
/// empty, not UTF-8, not JSON (including nesting deeper than [`MAX_NESTING`]) or
/// not an object.
pub fn parse_object(bytes: &[u8], max_size: usize) -> Result<Map<String, Value>, WireError> {
    if bytes.is_empty() {
        return Err(WireError::bad_request("empty message"));
    }
    if max_size > 0 && bytes.len() > max_size {
        return Err(WireError {
            code: code::TOO_LARGE,
            message: format!(
                "message of {} bytes exceeds the limit of {max_size}",
                bytes.len()
            ),
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|err| {
        WireError::bad_request(format!(
            "message is not UTF-8 (at byte {})",
            err.valid_up_to()
        ))
    })?;
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(WireError::bad_request(format!(
            "message must be a JSON object, got {}",
            json_kind(&other)
        ))),
        Err(err) => Err(WireError::bad_request(format!(
            "message is not valid JSON: {err}"
        ))),
    }
}

/// The most levels of arrays and objects a body may nest: serde_json, and so
/// every decoder here and every Rust peer, refuses the 128th level.
pub const MAX_NESTING: usize = 127;

/// The levels of arrays and objects in `value` at its deepest point (0 for a
/// scalar), counted with an explicit stack so that any depth is safe.
pub fn nesting_depth(value: &Value) -> usize {
    let mut deepest = 0;
    let mut pending = vec![(value, 1)];
    while let Some((value, depth)) = pending.pop() {
        match value {
            Value::Array(items) => pending.extend(items.iter().map(|item| (item, depth + 1))),
            Value::Object(map) => pending.extend(map.values().map(|item| (item, depth + 1))),
            _ => continue,
        }
        deepest = deepest.max(depth);
    }
    deepest
}

/// A payload as a JSON object: an object as it is, `null` as `{}`, any other
/// value wrapped as `{"value": ...}`.
fn into_object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        Value::Null => Map::new(),
        other => Map::from_iter([("value".to_string(), other)]),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Message priority: 0 normal, 1 high, 2 urgent.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(try_from = "u8", into = "u8")]
pub enum Priority {
    #[default]
    Normal,
    High,
    Urgent,
}

impl Priority {
    /// The priority a JSON value names (0, 1 or 2), if it names one.
    pub fn from_json(value: &Value) -> Option<Priority> {
        let number = u8::try_from(value.as_u64()?).ok()?;
        Priority::try_from(number).ok()
    }
}

impl TryFrom<u8> for Priority {
    type Error = String;

    fn try_from(value: u8) -> Result<Self, Self::Error> {
        match value {
            0 => Ok(Priority::Normal),
            1 => Ok(Priority::High),
            2 => Ok(Priority::Urgent),
            other => Err(format!("priority must be 0, 1 or 2, got {other}")),
        }
    }
}

impl From<Priority> for u8 {
    fn from(priority: Priority) -> u8 {
        priority as u8
    }
}

/// A request on the command or data bus.
///
/// Every field is optional on the wire; unknown fields are ignored.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CommandRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_uuid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    pub payload: Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub priority: Priority,
}

impl CommandRequest {
    /// A request for `command` with `payload`, nothing else set.
    pub fn new(command: impl Into<String>, payload: Value) -> Self {
        let payload = into_object(payload);
        Self {
            command: Some(command.into()),
            payload,
            ..Self::default()
        }
    }

    /// Decode a request body.
    ///
    /// # Errors
    ///
    /// As [`parse_object`], plus `bad_request` naming the first field whose
    /// type is wrong.
    pub fn decode(bytes: &[u8], max_size: usize) -> Result<Self, WireError> {
        Self::from_object(parse_object(bytes, max_size)?)
    }

    /// Build a request from an already parsed object.
    ///
    /// # Errors
    ///
    /// `bad_request` naming the first field whose type is wrong.
    pub fn from_object(mut map: Map<String, Value>) -> Result<Self, WireError> {
        let payload = match map.remove("payload") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(payload)) => payload,
            Some(other) => return Err(wrong_type("payload", "an object", &other)),
        };
        let priority = match map.remove("priority") {
            None | Some(Value::Null) => Priority::Normal,
            Some(value) => Priority::from_json(&value)
                .ok_or_else(|| WireError::bad_request("field `priority` must be 0, 1 or 2"))?,
        };
        Ok(Self {
            command: optional_string(&mut map, "command")?,
            job_uuid: optional_string(&mut map, "job_uuid")?,
            request_id: optional_string(&mut map, "request_id")?,
            source: optional_string(&mut map, "source")?,
            timestamp: map.remove("timestamp").filter(|v| !v.is_null()),
            payload,
            priority,
        })
    }

    /// Encode as compact JSON.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a CommandRequest always serialises")
    }

    /// The key duplicates are recognised by: `job_uuid`, else `request_id`.
    pub fn dedup_key(&self) -> Option<&str> {
        self.job_uuid.as_deref().or(self.request_id.as_deref())
    }

    /// The identity a reply echoes for this request.
    pub fn echo(&self) -> Echo {
        Echo {
            job_uuid: self.dedup_key().map(str::to_string),
            request_id: self.request_id.clone(),
        }
    }
}

fn optional_string(map: &mut Map<String, Value>, key: &str) -> Result<Option<String>, WireError> {
    match map.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(other) => Err(wrong_type(key, "a string", &other)),
    }
}

fn wrong_type(key: &str, expected: &str, got: &Value) -> WireError {
    WireError::bad_request(format!(
        "field `{key}` must be {expected}, got {}",
        json_kind(got)
    ))
}

/// The identity a reply echoes: `job_uuid` (the request's `job_uuid`, else
/// its `request_id`, else null) and `request_id` when the request had one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Echo {
    pub job_uuid: Option<String>,
    pub request_id: Option<String>,
}

impl Echo {
    /// Recover what can be echoed from a body that failed to decode as a
    /// request, so that even a `bad_request` reply names its request.
    pub fn salvage(bytes: &[u8]) -> Echo {
        let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(bytes) else {
            return Echo::default();
        };
        let text = |key: &str| map.get(key).and_then(Value::as_str).map(str::to_string);
        let request_id = text("request_id");
        Echo {
            job_uuid: text("job_uuid").or_else(|| request_id.clone()),
            request_id,
        }
    }
}

/// The outcome of a command, as the wire carries it.
#[derive(Debug, Clone, PartialEq)]
pub enum CommandReply {
    Ok {
        echo: Echo,
        result: Value,
    },
    Error {
        echo: Echo,
        code: String,
        error: String,
    },
}

impl CommandReply {
    pub fn ok(echo: Echo, result: Value) -> Self {
        CommandReply::Ok { echo, result }
    }

    pub fn error(echo: Echo, code: impl Into<String>, error: impl Into<String>) -> Self {
        CommandReply::Error {
            echo,
            code: code.into(),
            error: error.into(),
        }
    }

    /// The same outcome addressed to another request's identity.
    pub fn with_echo(mut self, new_echo: Echo) -> Self {
        match &mut self {
            CommandReply::Ok { echo, .. } | CommandReply::Error { echo, .. } => *echo = new_echo,
        }
        self
    }

    pub fn is_ok(&self) -> bool {
        matches!(self, CommandReply::Ok { .. })
    }

    /// The machine code of an error reply.
    pub fn code(&self) -> Option<&str> {
        match self {
            CommandReply::Ok { .. } => None,
            CommandReply::Error { code, .. } => Some(code),
        }
    }

    /// The reply as a JSON object, keys in wire order.
    pub fn to_value(&self) -> Value {
        let mut map = Map::new();
        let echo = match self {
            CommandReply::Ok { echo, .. } => echo,
            CommandReply::Error { echo, .. } => echo,
        };
        let status = if self.is_ok() { "ok" } else { "error" };
        map.insert("status".into(), status.into());
        map.insert(
            "job_uuid".into(),
            echo.job_uuid.clone().map_or(Value::Null, Value::String),
        );
        if let Some(request_id) = &echo.request_id {
            map.insert("request_id".into(), request_id.clone().into());
        }
        match self {
            CommandReply::Ok { result, .. } => {
                map.insert("result".into(), result.clone());
            }
            CommandReply::Error { code, error, .. } => {
                map.insert("error".into(), error.clone().into());
                map.insert("code".into(), code.clone().into());
            }
        }
        Value::Object(map)
    }

    /// Encode as compact JSON.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(&self.to_value()).expect("a reply always serialises")
    }

    /// Decode a reply body.
    ///
    /// # Errors
    ///
    /// As [`parse_object`], plus `bad_request` when `status` is neither `ok`
    /// nor `error`.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let map = parse_object(bytes, 0)?;
        let text = |key: &str| map.get(key).and_then(Value::as_str).map(str::to_string);
        let echo = Echo {
            job_uuid: text("job_uuid"),
            request_id: text("request_id"),
        };
        match map.get("status").and_then(Value::as_str) {
            Some("ok") => Ok(CommandReply::Ok {
                echo,
                result: map.get("result").cloned().unwrap_or(Value::Null),
            }),
            Some("error") => Ok(CommandReply::Error {
                echo,
                code: text("code").unwrap_or_else(|| "error".into()),
                error: text("error").unwrap_or_default(),
            }),
            _ => Err(WireError::bad_request(
                "reply has no `status` of `ok` or `error`",
            )),
        }
    }
}

/// An event on the event bus: exactly dgbit's five keys, `event_type` first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    pub event_type: String,
    pub data: Map<String, Value>,
    pub timestamp: String,
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
}

impl Event {
    /// A new event stamped now.
    pub fn new(event_type: impl Into<String>, source: impl Into<String>, data: Value) -> Self {
        let data = into_object(data);
        Self {
            event_type: event_type.into(),
            data,
            timestamp: now_rfc3339(),
            source: source.into(),
            correlation_id: None,
        }
    }

    pub fn with_correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Encode as compact JSON with `event_type` first.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an Event always serialises")
    }

    /// Decode an event body.
    ///
    /// # Errors
    ///
    /// As [`parse_object`], plus `bad_request` for a missing key, a key of the
    /// wrong type or any key outside the five.
    pub fn decode(bytes: &[u8], max_size: usize) -> Result<Self, WireError> {
        Self::from_object(parse_object(bytes, max_size)?)
    }

    /// Build an event from a parsed object; `timestamp` and `source` may be
    /// left out and are then filled in (now, and `"remote"`).
    ///
    /// # Errors
    ///
    /// `bad_request` for a missing `event_type`, a key of the wrong type or
    /// any key outside the five.
    pub fn from_object(mut map: Map<String, Value>) -> Result<Self, WireError> {
        map.entry("timestamp")
            .or_insert_with(|| now_rfc3339().into());
        map.entry("source").or_insert_with(|| "remote".into());
        map.entry("data")
            .or_insert_with(|| Value::Object(Map::new()));
        let event: Event = serde_json::from_value(Value::Object(map))
            .map_err(|err| WireError::bad_request(format!("not a valid event: {err}")))?;
        if event.event_type.is_empty() {
            return Err(WireError::bad_request("`event_type` must not be empty"));
        }
        Ok(event)
    }
}

/// A job on the job queue: exactly dgbit's seven keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobMessage {
    pub job_id: String,
    pub job_type: String,
    pub payload: Map<String, Value>,
    pub priority: Priority,
    pub created_at: String,
    pub retry_count: u32,
    pub max_retries: u32,
}

/// How many times a job is retried when its producer does not say.
pub const DEFAULT_MAX_RETRIES: u32 = 3;

impl JobMessage {
    /// A new job with a fresh UUID, created now.
    pub fn new(job_type: impl Into<String>, payload: Value) -> Self {
        let payload = into_object(payload);
        Self {
            job_id: uuid::Uuid::new_v4().to_string(),
            job_type: job_type.into(),
            payload,
            priority: Priority::Normal,
            created_at: now_rfc3339(),
            retry_count: 0,
            max_retries: DEFAULT_MAX_RETRIES,
        }
    }

    pub fn with_priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    pub fn with_max_retries(mut self, max_retries: u32) -> Self {
        self.max_retries = max_retries;
        self
    }

    /// Encode as compact JSON.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a JobMessage always serialises")
    }

    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).expect("a JobMessage always serialises")
    }

    /// Decode a job body.
    ///
    /// # Errors
    ///
    /// As [`parse_object`], plus `bad_request` for a missing or mistyped key
    /// or any key outside the seven.
    pub fn decode(bytes: &[u8], max_size: usize) -> Result<Self, WireError> {
        Self::from_value(Value::Object(parse_object(bytes, max_size)?))
    }

    /// Build a job from a parsed value.
    ///
    /// # Errors
    ///
    /// `bad_request` for a missing or mistyped key or any key outside the
    /// seven.
    pub fn from_value(value: Value) -> Result<Self, WireError> {
        serde_json::from_value(value)
            .map_err(|err| WireError::bad_request(format!("not a valid job: {err}")))
    }
}

/// The current time as RFC 3339 UTC with exactly six fractional digits and
/// a `+00:00` offset, e.g. `2024-05-01T12:00:00.123456+00:00`: the form
/// Python's `datetime.fromisoformat` reads on every version since 3.7.
pub fn now_rfc3339() -> String {
    let now = OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}+00:00",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.microsecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_backtest_dispatch_without_command_decodes_with_payload() {
        let body = br#"{"job_uuid": "550e8400-e29b-41d4-a716-446655440000", "payload": {"symbol": "BTCUSDT", "interval": "15", "limit": 1000}}"#;
        let request = CommandRequest::decode(body, 0).unwrap();
        assert_eq!(request.command, None);
        assert_eq!(
            request.job_uuid.as_deref(),
            Some("550e8400-e29b-41d4-a716-446655440000")
        );
        assert_eq!(request.payload["limit"], json!(1000));
        assert_eq!(request.priority, Priority::Normal);
    }

    #[test]
    fn request_id_is_echoed_as_job_uuid_and_request_id() {
        let request =
            CommandRequest::decode(br#"{"command": "ping", "request_id": "r-1"}"#, 0).unwrap();
        let reply = CommandReply::ok(request.echo(), json!("pong"));
        assert_eq!(
            reply.to_value(),
            json!({"status": "ok", "job_uuid": "r-1", "request_id": "r-1", "result": "pong"})
        );
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let body = br#"{"command": "ping", "trace": {"a": 1}, "source": "api", "timestamp": 1.5}"#;
        let request = CommandRequest::decode(body, 0).unwrap();
        assert_eq!(request.command.as_deref(), Some("ping"));
        assert_eq!(request.source.as_deref(), Some("api"));
        assert!(request.payload.is_empty());
    }

    #[test]
    fn a_reply_with_no_identity_echoes_null() {
        let reply = CommandReply::error(Echo::default(), code::BAD_REQUEST, "empty message");
        assert_eq!(
            reply.to_value(),
            json!({"status": "error", "job_uuid": null, "error": "empty message", "code": "bad_request"})
        );
    }

    #[test]
    fn each_malformed_body_gets_its_code() {
        let cases: [(&[u8], &str); 7] = [
            (b"", code::BAD_REQUEST),
            (b"\xff\xfe{}", code::BAD_REQUEST),
            (b"{\"command\": ", code::BAD_REQUEST),
            (b"[1, 2]", code::BAD_REQUEST),
            (br#"{"command": 5}"#, code::BAD_REQUEST),
            (br#"{"payload": [1]}"#, code::BAD_REQUEST),
            (br#"{"priority": 7}"#, code::BAD_REQUEST),
        ];
        for (body, expected) in cases {
            let err = CommandRequest::decode(body, 0).unwrap_err();
            assert_eq!(err.code, expected, "body {body:?}");
        }
    }

    #[test]
    fn an_oversize_body_is_too_large_and_names_the_size() {
        let err = CommandRequest::decode(&[b' '; 100], 10).unwrap_err();
        assert_eq!(err.code, code::TOO_LARGE);
        assert!(err.message.contains("100"), "{}", err.message);
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let depth = 100_000;
        let body = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let err = CommandRequest::decode(body.as_bytes(), 0).unwrap_err();
        assert_eq!(err.code, code::BAD_REQUEST);
    }

    #[test]
    fn nesting_depth_counts_containers_without_recursing() {
        assert_eq!(nesting_depth(&json!(1)), 0);
        assert_eq!(nesting_depth(&json!({"a": [1, {"b": []}], "c": {}})), 4);
        let mut deep = json!(1);
        for _ in 0..MAX_NESTING {
            deep = json!([deep]);
        }
        assert_eq!(nesting_depth(&deep), MAX_NESTING);
        let text = serde_json::to_string(&deep).unwrap();
        assert!(parse_object(format!("{{\"a\": {text}}}").as_bytes(), 0).is_err());
        assert!(serde_json::from_str::<Value>(&text).is_ok());
    }

    #[test]
    fn a_bad_request_still_salvages_its_identity() {
        let echo = Echo::salvage(br#"{"job_uuid": "j-1", "payload": 3}"#);
        assert_eq!(echo.job_uuid.as_deref(), Some("j-1"));
        assert_eq!(Echo::salvage(b"junk"), Echo::default());
    }

    #[test]
    fn events_serialise_event_type_first_with_five_keys_at_most() {
        let event = Event::new("job.completed", "bus", json!({"job_id": "x"}));
        let text = String::from_utf8(event.encode()).unwrap();
        assert!(text.starts_with(r#"{"event_type":"job."#), "{text}");
        let keys: Vec<String> = serde_json::from_str::<Map<String, Value>>(&text)
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(keys, ["event_type", "data", "timestamp", "source"]);
        let with_id = event.with_correlation_id("c-1");
        assert_eq!(Event::decode(&with_id.encode(), 0).unwrap(), with_id);
    }

    #[test]
    fn an_event_with_a_foreign_key_is_rejected() {
        let err = Event::decode(br#"{"event_type": "x", "data": {}, "extra": 1}"#, 0).unwrap_err();
        assert_eq!(err.code, code::BAD_REQUEST);
    }

    #[test]
    fn a_job_round_trips_with_exactly_seven_keys() {
        let job = JobMessage::new("run_backtest", json!({"symbol": "EURUSD"}));
        let value = job.to_value();
        assert_eq!(value.as_object().unwrap().len(), 7);
        assert_eq!(JobMessage::decode(&job.encode(), 0).unwrap(), job);
        let python = br#"{"job_id": "6c7e", "job_type": "fetch", "payload": {}, "priority": 2, "created_at": "2024-01-01T00:00:00", "retry_count": 1, "max_retries": 3}"#;
        assert_eq!(
            JobMessage::decode(python, 0).unwrap().priority,
            Priority::Urgent
        );
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let stamp = now_rfc3339();
        assert!(stamp.ends_with("+00:00"), "{stamp}");
        assert_eq!(
            stamp.len(),
            "2024-05-01T12:00:00.123456+00:00".len(),
            "{stamp}"
        );
        assert!(
            OffsetDateTime::parse(&stamp, &time::format_description::well_known::Rfc3339).is_ok()
        );
    }
}
