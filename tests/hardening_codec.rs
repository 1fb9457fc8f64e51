//! Hostile input against the wire codec and, over ipc, against a live bus.
//!
//! Property tests with a bounded number of cases feed the three decoders
//! (`CommandRequest`, `Event`, `JobMessage`) every kind of bad body the issue
//! lists: arbitrary bytes, truncated JSON, nesting 100 000 levels deep, huge
//! strings, numbers out of range, wrong types in every field, lone
//! surrogates, duplicate keys, BOMs and NULs. Each must come back as a value
//! or as an error with a known code, never a panic or a stack overflow (the
//! deep cases run on a deliberately small stack). The same bodies then go to
//! a `dgbit-bus serve` child through a `BusClient`: each gets a well-formed
//! reply with the predicted code, and a `ping` right after is served.
//!
//! Bodies that once broke something live in `tests/fuzz_corpus/`, one file
//! each, named `<expected code or ok>--<what it is>.<ext>`, and are replayed
//! by a normal test.

mod common;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dgbit_bus::client::{BusClient, ClientOptions};
use dgbit_bus::wire::{code, CommandReply, CommandRequest, Echo, Event, JobMessage, Priority};
use nng::options::Options as _;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use serde_json::{json, Map, Value};

use common::{bus_command, TestAddresses};

/// Cases per pure codec property.
const CODEC_CASES: u32 = 512;
/// Cases per property run against a live bus (two round trips each).
const LIVE_CASES: u32 = 256;
/// The message limit of the live bus: small enough that the huge-string
/// cases cross it, large enough for 100 000 levels of brackets.
const LIVE_MAX_MESSAGE: usize = 1024 * 1024;
/// Stack of the threads that decode deeply nested bodies. serde_json needs a
/// few dozen KiB for its 128 levels; 100 000 recursive levels would need
/// megabytes, so any deep recursion overflows here and aborts the run.
const SMALL_STACK: usize = 512 * 1024;

const KNOWN_CODES: [&str; 8] = code::ALL;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // Failures are kept by hand in tests/fuzz_corpus/, not in
        // proptest's own regression files.
        failure_persistence: None,
        max_shrink_iters: 1024,
        max_shrink_time: 30_000,
        ..ProptestConfig::default()
    }
}

/// Run `work` on a thread with a small stack and return its result.
fn on_small_stack<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .name("small-stack".into())
        .stack_size(SMALL_STACK)
        .spawn(work)
        .expect("spawn a small-stack thread")
        .join()
        .expect("decoding panicked")
}

// ---------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------

/// Numbers whose decimal form parses back exactly.
fn exact_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1_000_000i64..1_000_000).prop_map(|n| Value::from(n as f64 / 8.0)),
    ]
}

/// Any JSON value a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        exact_number(),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((".{0,8}", inner), 0..5)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
        ]
    })
}

fn json_object() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::vec(("[a-z_]{1,8}", json_value()), 0..5)
        .prop_map(|pairs| pairs.into_iter().collect())
}

fn command_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("ping".to_string()),
        Just("echo".to_string()),
        Just("status".to_string()),
        Just("no_such_command".to_string()),
        ".{0,12}",
    ]
}

/// A well-formed request with any mix of fields set.
fn valid_request() -> impl Strategy<Value = CommandRequest> {
    (
        prop::option::of(command_name()),
        prop::option::of(".{0,24}"),
        prop::option::of(".{0,24}"),
        json_object(),
        prop::option::of(json_value()),
        prop::option::of(".{0,12}"),
        0u8..3,
    )
        .prop_map(
            |(command, job_uuid, request_id, payload, timestamp, source, priority)| {
                CommandRequest {
                    command,
                    job_uuid,
                    request_id,
                    payload,
                    timestamp: timestamp.filter(|value| !value.is_null()),
                    source,
                    priority: Priority::try_from(priority).expect("0..3 is a priority"),
                }
            },
        )
}

fn valid_event() -> impl Strategy<Value = Event> {
    (
        "[a-z]{1,8}\\.[a-z]{1,8}",
        json_object(),
        ".{0,24}",
        ".{0,12}",
        prop::option::of(".{0,12}"),
    )
        .prop_map(
            |(event_type, data, timestamp, source, correlation_id)| Event {
                event_type,
                data,
                timestamp,
                source,
                correlation_id,
            },
        )
}

fn valid_job() -> impl Strategy<Value = JobMessage> {
    (
        ".{0,36}",
        ".{0,12}",
        json_object(),
        0u8..3,
        ".{0,24}",
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(
            |(job_id, job_type, payload, priority, created_at, retry_count, max_retries)| {
                JobMessage {
                    job_id,
                    job_type,
                    payload,
                    priority: Priority::try_from(priority).expect("0..3 is a priority"),
                    created_at,
                    retry_count,
                    max_retries,
                }
            },
        )
}

/// A value of any kind but the ones listed in `allowed`.
fn value_other_than(allowed: &'static [&'static str]) -> impl Strategy<Value = Value> {
    json_value().prop_filter("a wrong type", move |value| !allowed.contains(&kind(value)))
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The request fields and the kinds each accepts.
const REQUEST_FIELDS: [(&str, &[&str]); 5] = [
    ("command", &["null", "string"]),
    ("job_uuid", &["null", "string"]),
    ("request_id", &["null", "string"]),
    ("source", &["null", "string"]),
    ("payload", &["null", "object"]),
];

const EVENT_FIELDS: [(&str, &[&str]); 5] = [
    ("event_type", &["string"]),
    ("data", &["object"]),
    ("timestamp", &["string"]),
    ("source", &["string"]),
    ("correlation_id", &["null", "string"]),
];

const JOB_FIELDS: [(&str, &[&str]); 7] = [
    ("job_id", &["string"]),
    ("job_type", &["string"]),
    ("payload", &["object"]),
    ("priority", &["number"]),
    ("created_at", &["string"]),
    ("retry_count", &["number"]),
    ("max_retries", &["number"]),
];

/// Number literals as text: plain integers, fractions, exponents, and the
/// out-of-range forms the issue names.
fn number_text() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u32..4).prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        (any::<u64>(), 0u8..10).prop_map(|(n, extra)| format!("{n}{extra}0000000000")),
        (-5i32..5, 0u32..100).prop_map(|(n, f)| format!("{n}.{f}")),
        (-5i32..5, -400i32..400).prop_map(|(n, e)| format!("{n}e{e}")),
        prop::sample::select(vec![
            "1e400",
            "-1e400",
            "-1",
            "3.5",
            "2.0",
            "-0",
            "0.0",
            "1E0",
            "1e0",
            "2e0",
            "18446744073709551616",
            "4294967296",
            "4294967295",
            "-4294967296",
        ])
        .prop_map(str::to_string),
    ]
}

/// Whether `text` is the JSON form of an integer in `0..=max` as serde_json
/// reads it into an unsigned integer: digits only, no sign, no fraction, no
/// exponent.
fn is_plain_unsigned_at_most(text: &str, max: u64) -> bool {
    let digits_only = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    let canonical = text == "0" || !text.starts_with('0');
    digits_only && canonical && text.parse::<u64>().is_ok_and(|n| n <= max)
}

/// A `\uXXXX` escape that cannot stand alone: a high surrogate with no low
/// one after it, or a low surrogate on its own.
fn lone_surrogate() -> impl Strategy<Value = String> {
    prop_oneof![
        (0xD800u32..0xDC00).prop_map(|high| format!("\\u{high:04x}")),
        (0xDC00u32..0xE000).prop_map(|low| format!("\\u{low:04X}")),
        (0xD800u32..0xDC00, 0x0000u32..0xD800)
            .prop_map(|(high, next)| format!("\\u{high:04x}\\u{next:04x}")),
        (0xD800u32..0xDC00, "[a-z]{0,3}").prop_map(|(high, tail)| format!("\\u{high:04x}{tail}")),
    ]
}

/// Where a string with a lone surrogate goes in a request.
const SURROGATE_PLACES: [&str; 6] = [
    r#"{"command": "@"}"#,
    r#"{"command": "ping", "job_uuid": "@"}"#,
    r#"{"command": "ping", "payload": {"@": 1}}"#,
    r#"{"command": "ping", "payload": {"a": [1, {"b": "@"}]}}"#,
    r#"{"command": "ping", "@": true}"#,
    r#"{"command": "ping", "timestamp": "@"}"#,
];

/// A body with a decoration the codec must refuse: BOMs, NULs, raw control
/// characters, other encodings.
fn decorated_body() -> impl Strategy<Value = Vec<u8>> {
    (valid_request(), 0usize..7, any::<u8>()).prop_map(|(request, how, byte)| {
        let body = request.encode();
        let control = [byte % 0x20];
        match how {
            0 => [b"\xEF\xBB\xBF".as_slice(), &body].concat(),
            1 => [body.as_slice(), b"\0"].concat(),
            2 => [b"\0".as_slice(), &body].concat(),
            3 => [b"{\"command\": \"pi".as_slice(), &control, b"ng\"}"].concat(),
            4 => [b"{\"job_uuid\": \"a\0b\"}".as_slice()].concat(),
            5 => {
                let text = String::from_utf8(body).expect("encode gives UTF-8");
                let mut utf16 = vec![0xFE, 0xFF];
                for unit in text.encode_utf16() {
                    utf16.extend(unit.to_be_bytes());
                }
                utf16
            }
            _ => [body.as_slice(), b"\n{}"].concat(),
        }
    })
}

/// Brackets nested `depth` deep, in one of several shapes and places.
fn deep_body(depth: usize, shape: u8, place: u8, closed: bool) -> Vec<u8> {
    let (open, close): (&str, &str) = match shape % 3 {
        0 => ("[", "]"),
        1 => ("{\"a\":", "}"),
        _ => ("[{\"a\":", "}]"),
    };
    let mut inner = open.repeat(depth);
    inner.push('1');
    if closed {
        inner.push_str(&close.repeat(depth));
    }
    let body = match place % 4 {
        0 => inner,
        1 => format!(r#"{{"command": "echo", "payload": {{"deep": {inner}}}}}"#),
        2 => format!(r#"{{"command": "ping", "unknown": {inner}}}"#),
        _ => format!(r#"{{"command": "ping", "job_uuid": "deep", "timestamp": {inner}}}"#),
    };
    body.into_bytes()
}

/// One hostile body of any category, with the category's name.
fn hostile_body() -> impl Strategy<Value = (&'static str, Vec<u8>)> {
    let tokens = prop::sample::select(vec![
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        " ",
        "\"command\"",
        "\"ping\"",
        "\"job_uuid\"",
        "\"payload\"",
        "\"priority\"",
        "1e400",
        "-1",
        "3.5",
        "null",
        "true",
        "\"\\ud800\"",
        "\"\\u0000\"",
        "\u{feff}",
        "\0",
        "\"",
        "\\",
    ]);
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256).prop_map(|bytes| ("bytes", bytes)),
        prop::collection::vec(tokens, 0..32)
            .prop_map(|parts| ("tokens", parts.concat().into_bytes())),
        (valid_request(), any::<prop::sample::Index>()).prop_map(|(request, cut)| {
            let body = request.encode();
            ("truncated", body[..cut.index(body.len())].to_vec())
        }),
        valid_request().prop_map(|request| ("valid", request.encode())),
        (0usize..REQUEST_FIELDS.len(), json_value()).prop_map(|(field, value)| {
            let mut map = Map::new();
            map.insert("command".into(), json!("ping"));
            map.insert(REQUEST_FIELDS[field].0.into(), value);
            ("field type", serde_json::to_vec(&map).expect("serialises"))
        }),
        number_text().prop_map(|text| {
            let body = format!(r#"{{"command": "ping", "priority": {text}}}"#);
            ("priority", body.into_bytes())
        }),
        (0usize..SURROGATE_PLACES.len(), lone_surrogate()).prop_map(|(place, escape)| {
            (
                "surrogate",
                SURROGATE_PLACES[place].replace('@', &escape).into_bytes(),
            )
        }),
        duplicate_key_body().prop_map(|(body, _)| ("duplicate keys", body)),
        decorated_body().prop_map(|body| ("decorated", body)),
        (118usize..132, any::<u8>()).prop_map(|(depth, shape)| {
            ("near the depth limit", deep_body(depth, shape, 1, true))
        }),
        (129usize..100_001, any::<u8>(), any::<u8>(), any::<bool>()).prop_map(
            |(depth, shape, place, closed)| { ("deep", deep_body(depth, shape, place, closed)) }
        ),
        (
            prop::sample::select(vec![
                1000usize,
                64 * 1024,
                LIVE_MAX_MESSAGE - 64,
                LIVE_MAX_MESSAGE + 1
            ]),
            0u8..3
        )
            .prop_map(|(size, place)| ("huge string", huge_string_body(size, place))),
    ]
}

/// An object text with repeated keys, and the object it stands for when
/// the last value of each key wins.
fn duplicate_key_body() -> impl Strategy<Value = (Vec<u8>, Map<String, Value>)> {
    let key = prop::sample::select(vec![
        "command",
        "job_uuid",
        "request_id",
        "payload",
        "priority",
        "source",
        "x",
    ]);
    let value = prop_oneof![
        Just(json!("ping")),
        Just(json!("echo")),
        Just(json!("no_such_command")),
        Just(json!(1)),
        Just(json!(7)),
        Just(json!(null)),
        Just(json!({"n": 1})),
        Just(json!([1])),
        ".{0,6}".prop_map(Value::from),
    ];
    prop::collection::vec((key, value), 1..12).prop_map(|pairs| {
        let members: Vec<String> = pairs
            .iter()
            .map(|(key, value)| format!("{}: {}", json!(key), value))
            .collect();
        let mut last_wins = Map::new();
        for (key, value) in pairs {
            last_wins.insert(key.to_string(), value);
        }
        (
            format!("{{{}}}", members.join(", ")).into_bytes(),
            last_wins,
        )
    })
}

/// A request whose body is `size` bytes, most of them one string placed in
/// the command name, the job uuid or the payload.
fn huge_string_body(size: usize, place: u8) -> Vec<u8> {
    let frame = match place % 3 {
        0 => r#"{"command": "@"}"#,
        1 => r#"{"command": "ping", "job_uuid": "@"}"#,
        _ => r#"{"command": "echo", "payload": {"blob": "@"}}"#,
    };
    let fill = size.saturating_sub(frame.len() - 1);
    frame.replace('@', &"x".repeat(fill)).into_bytes()
}

// ---------------------------------------------------------------------------
// Expectations
// ---------------------------------------------------------------------------

/// What every decoder must do with `body`: a value, or an error with a known
/// code and some text.
fn check_every_decoder(body: &[u8], max_size: usize) -> Result<(), TestCaseError> {
    let outcomes = [
        ("request", CommandRequest::decode(body, max_size).err()),
        ("event", Event::decode(body, max_size).err()),
        ("job", JobMessage::decode(body, max_size).err()),
        ("reply", CommandReply::decode(body).err()),
    ];
    for (decoder, error) in outcomes {
        if let Some(error) = error {
            prop_assert!(KNOWN_CODES.contains(&error.code), "{decoder}: {error:?}");
            prop_assert!(!error.message.is_empty(), "{decoder}: empty message");
        }
    }
    let _ = Echo::salvage(body);
    Ok(())
}

/// The reply a `dgbit-bus serve` (built-in commands only, default route
/// `run_backtest` not registered) owes `body`: `None` for ok, else the code.
fn predicted_code(body: &[u8], max_size: usize) -> Option<&'static str> {
    match CommandRequest::decode(body, max_size) {
        Err(error) => Some(error.code),
        Ok(request) => match request.command.as_deref() {
            // The reply wraps the payload in two more objects.
            Some("echo") if depth_of_object(&request.payload) + 2 > DEEPEST_READABLE => {
                Some(code::HANDLER_FAILED)
            }
            Some("ping" | "echo" | "status") => None,
            _ => Some(code::UNKNOWN_COMMAND),
        },
    }
}

/// The most levels of arrays and objects serde_json reads (it refuses the
/// 128th), and so the most a reply may have for a Rust peer to decode it.
const DEEPEST_READABLE: usize = 127;

/// Levels of arrays and objects in `map`, itself included, counted with an
/// explicit stack.
fn depth_of_object(map: &Map<String, Value>) -> usize {
    let mut deepest = 1;
    let mut pending: Vec<(&Value, usize)> = map.values().map(|value| (value, 2)).collect();
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

/// The `job_uuid` the reply to `body` must echo.
fn predicted_echo(body: &[u8], max_size: usize) -> Option<String> {
    match CommandRequest::decode(body, max_size) {
        Ok(request) => request.dedup_key().map(str::to_string),
        Err(error) if error.code == code::TOO_LARGE => None,
        Err(_) => Echo::salvage(body).job_uuid,
    }
}

// ---------------------------------------------------------------------------
// Pure codec properties
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(CODEC_CASES))]

    #[test]
    fn arbitrary_bytes_give_a_value_or_a_coded_error_from_every_decoder(
        bytes in prop::collection::vec(any::<u8>(), 0..1024),
    ) {
        check_every_decoder(&bytes, 0)?;
        if let Err(error) = CommandRequest::decode(&bytes, 0) {
            prop_assert_eq!(error.code, code::BAD_REQUEST);
        }
        if bytes.len() > 1 {
            let error = CommandRequest::decode(&bytes, bytes.len() - 1).unwrap_err();
            prop_assert_eq!(error.code, code::TOO_LARGE);
            prop_assert!(error.message.contains(&bytes.len().to_string()), "{}", error.message);
        }
    }

    #[test]
    fn any_hostile_body_gives_a_value_or_a_coded_error_from_every_decoder(
        (_category, body) in hostile_body(),
    ) {
        let small = on_small_stack(move || check_every_decoder(&body, LIVE_MAX_MESSAGE));
        small?;
    }

    #[test]
    fn a_valid_request_round_trips_and_every_truncation_is_a_bad_request(
        request in valid_request(),
        cut in any::<prop::sample::Index>(),
    ) {
        let body = request.encode();
        prop_assert_eq!(&CommandRequest::decode(&body, 0).unwrap(), &request);
        let truncated = &body[..cut.index(body.len())];
        let error = CommandRequest::decode(truncated, 0).unwrap_err();
        prop_assert_eq!(error.code, code::BAD_REQUEST);
    }

    #[test]
    fn a_valid_event_or_job_round_trips_and_every_truncation_is_a_bad_request(
        event in valid_event(),
        job in valid_job(),
        cut in any::<prop::sample::Index>(),
    ) {
        let body = event.encode();
        prop_assert_eq!(&Event::decode(&body, 0).unwrap(), &event);
        let error = Event::decode(&body[..cut.index(body.len())], 0).unwrap_err();
        prop_assert_eq!(error.code, code::BAD_REQUEST);

        let body = job.encode();
        prop_assert_eq!(&JobMessage::decode(&body, 0).unwrap(), &job);
        let error = JobMessage::decode(&body[..cut.index(body.len())], 0).unwrap_err();
        prop_assert_eq!(error.code, code::BAD_REQUEST);
    }

    #[test]
    fn a_wrong_type_in_any_request_field_is_a_bad_request_naming_the_field(
        field in 0..REQUEST_FIELDS.len(),
        request in valid_request(),
        wrong in json_value(),
    ) {
        let (name, allowed) = REQUEST_FIELDS[field];
        prop_assume!(!allowed.contains(&kind(&wrong)));
        let mut map = serde_json::from_slice::<Map<String, Value>>(&request.encode()).unwrap();
        map.insert(name.into(), wrong);
        let body = serde_json::to_vec(&map).unwrap();
        let error = CommandRequest::decode(&body, 0).unwrap_err();
        prop_assert_eq!(error.code, code::BAD_REQUEST);
        prop_assert!(error.message.contains(name), "{} does not name {}", error.message, name);
    }

    #[test]
    fn a_wrong_type_in_any_event_field_is_a_bad_request(
        field in 0..EVENT_FIELDS.len(),
        event in valid_event(),
        wrong in json_value(),
    ) {
        let (name, allowed) = EVENT_FIELDS[field];
        prop_assume!(!allowed.contains(&kind(&wrong)));
        let mut map = serde_json::from_slice::<Map<String, Value>>(&event.encode()).unwrap();
        map.insert(name.into(), wrong);
        let error = Event::decode(&serde_json::to_vec(&map).unwrap(), 0).unwrap_err();
        prop_assert_eq!(error.code, code::BAD_REQUEST);
    }

    #[test]
    fn a_wrong_type_or_a_missing_key_in_a_job_is_a_bad_request(
        field in 0..JOB_FIELDS.len(),
        job in valid_job(),
        wrong in prop::option::of(value_other_than(&["number"])),
    ) {
        let (name, allowed) = JOB_FIELDS[field];
        let mut map = serde_json::from_slice::<Map<String, Value>>(&job.encode()).unwrap();
        match wrong {
            Some(value) if !allowed.contains(&kind(&value)) => {
                map.insert(name.into(), value);
            }
            Some(_) => return Ok(()),
            None => {
                map.remove(name);
            }
        }
        let error = JobMessage::decode(&serde_json::to_vec(&map).unwrap(), 0).unwrap_err();
        prop_assert_eq!(error.code, code::BAD_REQUEST);
    }

    #[test]
    fn priority_is_accepted_only_as_the_integers_0_1_and_2(text in number_text()) {
        let body = format!(r#"{{"command": "ping", "priority": {text}}}"#);
        let decoded = CommandRequest::decode(body.as_bytes(), 0);
        if is_plain_unsigned_at_most(&text, 2) {
            prop_assert_eq!(u8::from(decoded.unwrap().priority).to_string(), text.clone());
        } else {
            prop_assert_eq!(decoded.unwrap_err().code, code::BAD_REQUEST, "priority {}", text);
        }

        let job = JobMessage::new("fetch", json!({})).encode();
        let body = String::from_utf8(job).unwrap().replace(r#""priority":0"#, &format!(r#""priority":{text}"#));
        let decoded = JobMessage::decode(body.as_bytes(), 0);
        prop_assert_eq!(decoded.is_ok(), is_plain_unsigned_at_most(&text, 2), "job priority {}", text);
    }

    #[test]
    fn job_counters_are_accepted_only_as_unsigned_32_bit_integers(text in number_text()) {
        let job = JobMessage::new("fetch", json!({})).encode();
        let body = String::from_utf8(job).unwrap().replace(r#""retry_count":0"#, &format!(r#""retry_count":{text}"#));
        let decoded = JobMessage::decode(body.as_bytes(), 0);
        let fits = is_plain_unsigned_at_most(&text, u64::from(u32::MAX));
        prop_assert_eq!(decoded.is_ok(), fits, "retry_count {}", text);
    }

    #[test]
    fn a_lone_surrogate_escape_is_a_bad_request_wherever_it_appears(
        place in 0..SURROGATE_PLACES.len(),
        escape in lone_surrogate(),
    ) {
        let body = SURROGATE_PLACES[place].replace('@', &escape);
        let error = CommandRequest::decode(body.as_bytes(), 0).unwrap_err();
        prop_assert_eq!(error.code, code::BAD_REQUEST);
        prop_assert_eq!(Echo::salvage(body.as_bytes()), Echo::default());

        let event = format!(r#"{{"event_type": "job.failed", "data": {{"why": "{escape}"}}}}"#);
        prop_assert_eq!(Event::decode(event.as_bytes(), 0).unwrap_err().code, code::BAD_REQUEST);
        let job = String::from_utf8(JobMessage::new("fetch", json!({})).encode())
            .unwrap()
            .replace(r#""job_type":"fetch""#, &format!(r#""job_type":"{escape}""#));
        prop_assert_eq!(JobMessage::decode(job.as_bytes(), 0).unwrap_err().code, code::BAD_REQUEST);
    }

    #[test]
    fn a_surrogate_pair_escape_decodes_to_its_character(c in proptest::char::range('\u{10000}', '\u{10FFFF}')) {
        let mut units = [0u16; 2];
        c.encode_utf16(&mut units);
        let body = format!(r#"{{"command": "\u{:04x}\u{:04x}"}}"#, units[0], units[1]);
        let request = CommandRequest::decode(body.as_bytes(), 0).unwrap();
        prop_assert_eq!(request.command, Some(c.to_string()));
    }

    #[test]
    fn duplicate_keys_decode_as_if_the_last_value_of_each_won(
        (body, last_wins) in duplicate_key_body(),
    ) {
        let decoded = CommandRequest::decode(&body, 0);
        prop_assert_eq!(&decoded, &CommandRequest::from_object(last_wins));
        if let Ok(request) = decoded {
            prop_assert_eq!(Echo::salvage(&body), request.echo());
        }
    }

    #[test]
    fn boms_nuls_control_characters_and_utf16_are_bad_requests(body in decorated_body()) {
        let error = CommandRequest::decode(&body, 0).unwrap_err();
        prop_assert_eq!(error.code, code::BAD_REQUEST);
        check_every_decoder(&body, 0)?;
    }

    #[test]
    fn nesting_past_the_limit_is_a_bad_request_on_a_small_stack(
        depth in 129usize..100_001,
        shape in any::<u8>(),
        place in any::<u8>(),
        closed in any::<bool>(),
    ) {
        let body = deep_body(depth, shape, place, closed);
        let outcome = on_small_stack(move || {
            let echo = Echo::salvage(&body);
            let request = CommandRequest::decode(&body, 0).map_err(|e| e.code);
            let event = Event::decode(&body, 0).map_err(|e| e.code);
            let job = JobMessage::decode(&body, 0).map_err(|e| e.code);
            (echo, request.err(), event.err(), job.err())
        });
        prop_assert_eq!(outcome.0, Echo::default());
        prop_assert_eq!(outcome.1, Some(code::BAD_REQUEST));
        prop_assert_eq!(outcome.2, Some(code::BAD_REQUEST));
        prop_assert_eq!(outcome.3, Some(code::BAD_REQUEST));
    }
}

proptest! {
    #![proptest_config(config(24))]

    #[test]
    fn a_huge_string_decodes_under_the_limit_and_is_too_large_naming_its_size_over_it(
        size in 1024usize..4 * 1024 * 1024,
        place in 0u8..3,
    ) {
        let body = huge_string_body(size, place);
        let request = CommandRequest::decode(&body, 0).unwrap();
        let reply = CommandReply::ok(request.echo(), json!({"echo": request.payload})).encode();
        prop_assert!(CommandReply::decode(&reply).is_ok());
        let error = CommandRequest::decode(&body, body.len() - 1).unwrap_err();
        prop_assert_eq!(error.code, code::TOO_LARGE);
        prop_assert!(error.message.contains(&body.len().to_string()), "{}", error.message);
    }
}

#[test]
fn a_hundred_thousand_levels_are_a_bad_request_for_every_decoder_on_a_small_stack() {
    for shape in 0..3 {
        for place in 0..4 {
            for closed in [true, false] {
                let body = deep_body(100_000, shape, place, closed);
                let size = body.len();
                let codes = on_small_stack(move || {
                    [
                        CommandRequest::decode(&body, 0).err().map(|e| e.code),
                        Event::decode(&body, 0).err().map(|e| e.code),
                        JobMessage::decode(&body, 0).err().map(|e| e.code),
                        CommandReply::decode(&body).err().map(|e| e.code),
                    ]
                });
                assert_eq!(
                    codes,
                    [Some(code::BAD_REQUEST); 4],
                    "shape {shape} place {place}"
                );
                eprintln!(
                    "100 000 levels (shape {shape}, place {place}, closed {closed}, {size} bytes): bad_request from all four decoders"
                );
            }
        }
    }
}

/// The deepest payload the codec accepts, echoed back as the `echo` command
/// does: the reply is built and encoded on a small stack (the reply path
/// never recurses past the input's own bounded depth), and it decodes
/// whenever it nests no deeper than serde_json reads; deeper ones are the
/// replies the router turns into `handler_failed` (see the corpus).
#[test]
fn the_deepest_accepted_payload_is_echoed_back_on_a_small_stack() {
    let deepest = (1..200)
        .take_while(|depth| {
            let body = deep_body(*depth, 1, 1, true);
            CommandRequest::decode(&body, 0).is_ok()
        })
        .last()
        .expect("shallow nesting decodes");
    for depth in deepest - 2..=deepest {
        let body = deep_body(depth, 1, 1, true);
        let (reply_depth, reply_size, decodes) = on_small_stack(move || {
            let request = CommandRequest::decode(&body, 0).unwrap();
            let reply_depth = depth_of_object(&request.payload) + 2;
            let result = json!({"echo": request.payload});
            let reply = CommandReply::ok(request.echo(), result).encode();
            (
                reply_depth,
                reply.len(),
                CommandReply::decode(&reply).is_ok(),
            )
        });
        eprintln!(
            "payload with {depth} levels under it: echo reply {reply_depth} levels, \
             {reply_size} bytes, decodes: {decodes}"
        );
        assert_eq!(decodes, reply_depth <= DEEPEST_READABLE);
    }
    assert!(deepest >= 120, "only {deepest} levels accepted");
}

// ---------------------------------------------------------------------------
// Against a live bus
// ---------------------------------------------------------------------------

/// A `dgbit-bus serve` child and a client of its command socket. The
/// child keeps its dead letters in the test's temp dir.
struct LiveBus {
    addresses: TestAddresses,
    serve: RefCell<ServeChild>,
    client: BusClient,
    runtime: tokio::runtime::Runtime,
}

/// The serve process, killed when dropped.
struct ServeChild {
    child: Child,
}

impl Drop for ServeChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl LiveBus {
    fn start() -> LiveBus {
        let addresses = TestAddresses::new();
        let limit = LIVE_MAX_MESSAGE.to_string();
        let child = bus_command(&addresses.addresses)
            .args(["serve", "--max-message-size", &limit])
            .env("XDG_STATE_HOME", addresses.path())
            .env(
                "DGBIT_DEAD_LETTER_PATH",
                addresses.path().join("dead.sqlite"),
            )
            .stdout(Stdio::null())
            .spawn()
            .expect("dgbit-bus serve starts");
        let serve = RefCell::new(ServeChild { child });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let options = ClientOptions::default().timeout(Duration::from_secs(10));
        let url = addresses.addresses.command.clone();
        let client = BusClient::connect_lazy(&url, options).expect("a valid url");
        let pong = runtime.block_on(client.call("ping", json!({})));
        assert!(pong.is_ok(), "dgbit-bus serve did not answer: {pong:?}");
        LiveBus {
            addresses,
            serve,
            client,
            runtime,
        }
    }

    fn send(&self, body: &[u8]) -> Vec<u8> {
        self.runtime
            .block_on(self.client.send_raw(body))
            .unwrap_or_else(|err| panic!("no reply to {}: {err}", preview(body)))
    }

    /// The reply to `body` matches the codec's prediction, and a ping
    /// afterwards is served.
    fn check(&self, body: &[u8]) -> Result<(), TestCaseError> {
        let raw = self.send(body);
        let reply = CommandReply::decode(&raw).map_err(|err| {
            TestCaseError::fail(format!("malformed reply {}: {err}", preview(&raw)))
        })?;
        let value: Value = serde_json::from_slice(&raw).expect("decoded above");
        if let Some(expected) = predicted_code(body, LIVE_MAX_MESSAGE) {
            prop_assert_eq!(reply.code(), Some(expected), "reply {}", preview(&raw));
            prop_assert!(value["error"].as_str().is_some_and(|text| !text.is_empty()));
        } else {
            prop_assert!(reply.is_ok(), "reply {}", preview(&raw));
        }
        let echoed = value["job_uuid"].as_str().map(str::to_string);
        prop_assert_eq!(echoed, predicted_echo(body, LIVE_MAX_MESSAGE));

        let pong = CommandReply::decode(&self.send(br#"{"command": "ping"}"#)).unwrap();
        prop_assert!(pong.is_ok(), "ping after {} failed", preview(body));
        prop_assert!(
            self.serve
                .borrow_mut()
                .child
                .try_wait()
                .expect("wait on serve")
                .is_none(),
            "dgbit-bus serve exited"
        );
        Ok(())
    }
}

fn preview(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(120)]).into_owned();
    format!("{text:?} ({} bytes)", body.len())
}

#[test]
fn every_hostile_body_gets_a_coded_reply_from_a_live_bus_and_the_next_ping_is_served() {
    let bus = LiveBus::start();
    let mut runner = TestRunner::new(config(LIVE_CASES));
    let categories = RefCell::new(BTreeMap::<&str, usize>::new());
    let result = runner.run(&hostile_body(), |(category, body)| {
        *categories.borrow_mut().entry(category).or_default() += 1;
        bus.check(&body)
    });
    eprintln!("live hostile bodies by category: {:?}", categories.borrow());
    if let Err(failure) = result {
        panic!("{failure}");
    }
}

// ---------------------------------------------------------------------------
// The regression corpus
// ---------------------------------------------------------------------------

fn corpus_dir(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_corpus")
        .join(kind)
}

/// Every corpus file of `kind` with the outcome its name promises (`None`
/// for ok).
fn corpus(kind: &str) -> Vec<(String, Option<String>, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(corpus_dir(kind))
        .unwrap_or_else(|err| panic!("tests/fuzz_corpus/{kind}: {err}"))
        .map(|entry| entry.expect("a corpus entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let (expected, _) = name
                .split_once("--")
                .unwrap_or_else(|| panic!("{name}: name it <code or ok>--<what>"));
            let expected = (expected != "ok").then(|| expected.to_string());
            let body = std::fs::read(&path).expect("read a corpus file");
            (name, expected, body)
        })
        .collect()
}

#[test]
fn every_command_corpus_file_gets_its_named_reply_from_the_codec_and_a_live_bus() {
    let files = corpus("command");
    assert!(!files.is_empty(), "the command corpus is empty");
    let bus = LiveBus::start();
    for (name, expected, body) in &files {
        let predicted = on_small_stack({
            let body = body.clone();
            move || predicted_code(&body, LIVE_MAX_MESSAGE)
        });
        assert_eq!(predicted, expected.as_deref(), "codec, {name}");
        if let Err(failure) = bus.check(body) {
            panic!("live bus, {name}: {failure}");
        }
    }
    eprintln!("command corpus: {} files replayed", files.len());
}

#[test]
fn every_event_and_job_corpus_file_gets_its_named_outcome_from_the_codec() {
    let mut replayed = 0;
    for kind in ["event", "job"] {
        for (name, expected, body) in corpus(kind) {
            let outcome = on_small_stack(move || match kind {
                "event" => Event::decode(&body, LIVE_MAX_MESSAGE).err().map(|e| e.code),
                _ => JobMessage::decode(&body, LIVE_MAX_MESSAGE)
                    .err()
                    .map(|e| e.code),
            });
            assert_eq!(outcome, expected.as_deref(), "{kind}/{name}");
            replayed += 1;
        }
    }
    eprintln!("event and job corpus: {replayed} files replayed");
}

// ---------------------------------------------------------------------------
// The event bus and job queue commands
// ---------------------------------------------------------------------------

/// The commands through which remote peers reach the event bus, the job
/// queue and the dead letter queue.
const BUS_COMMANDS: [&str; 10] = [
    "bus.publish",
    "bus.enqueue",
    "bus.lease",
    "bus.report",
    "bus.cancel",
    "bus.jobs",
    "bus.dlq.list",
    "bus.dlq.show",
    "bus.dlq.replay",
    "bus.dlq.purge",
];

/// Every payload key those commands read.
const BUS_PAYLOAD_KEYS: [&str; 24] = [
    "event_type",
    "data",
    "source",
    "correlation_id",
    "timestamp",
    "job_id",
    "job_type",
    "payload",
    "priority",
    "max_retries",
    "created_at",
    "retry_count",
    "worker",
    "job_types",
    "wait_ms",
    "lease_id",
    "state",
    "progress",
    "result",
    "error",
    "id",
    "all",
    "offset",
    "limit",
];

/// `[[...[1]...]]`, `depth` levels, built without recursion.
fn nested_arrays(depth: usize) -> Value {
    (0..depth).fold(json!(1), |inner, _| Value::Array(vec![inner]))
}

/// Values that stress a field: wrong types, out-of-range numbers, empty and
/// long strings, topic-like text, nesting up to the request limit.
fn hostile_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        json_value(),
        prop::sample::select(vec![
            json!(-1),
            json!(1e300),
            json!(u64::MAX),
            json!(3.5),
            json!(""),
            json!(true),
            json!(null),
            json!([]),
            json!({}),
            json!("*"),
            json!("job.*"),
            json!("completed"),
            json!("failed"),
        ]),
        "[a-z.*]{0,12}".prop_map(Value::from),
        (0u64..20).prop_map(Value::from),
        (1usize..120).prop_map(nested_arrays),
        (1000usize..100_000).prop_map(|n| Value::from("x".repeat(n))),
    ]
}

/// A plausible payload for `command`, so that hostile values also reach the
/// checks past the first required field.
fn plausible_payload(command: &str, job_id: &str) -> Map<String, Value> {
    let value = match command {
        "bus.publish" => json!({"event_type": "trade.signal", "data": {"symbol": "EURUSD"}}),
        "bus.enqueue" => json!({"job_type": "hostile", "payload": {"n": 1}}),
        "bus.lease" => json!({"worker": "hostile-worker", "wait_ms": 0}),
        "bus.report" => json!({"worker": "hostile-worker", "job_id": job_id, "state": "failed"}),
        "bus.cancel" => json!({"job_id": job_id}),
        "bus.dlq.show" | "bus.dlq.replay" | "bus.dlq.purge" => json!({"id": job_id}),
        _ => json!({}),
    };
    match value {
        Value::Object(map) => map,
        _ => unreachable!("every payload above is an object"),
    }
}

/// A `bus.*` request with a plausible payload that has up to four keys
/// replaced or added with hostile values.
fn bus_request() -> impl Strategy<Value = Value> {
    let edits = prop::collection::vec(
        (
            prop::sample::select(BUS_PAYLOAD_KEYS.to_vec()),
            hostile_value(),
        ),
        0..5,
    );
    (
        prop::sample::select(BUS_COMMANDS.to_vec()),
        ".{0,36}",
        edits,
    )
        .prop_map(|(command, job_id, edits)| {
            let mut payload = plausible_payload(command, &job_id);
            for (key, value) in edits {
                // A long lease wait is legitimate, not hostile: keep the
                // cases quick.
                let value = match (key, value.as_u64()) {
                    ("wait_ms", Some(ms)) if ms > 20 => json!(0),
                    _ => value,
                };
                payload.insert(key.to_string(), value);
            }
            json!({"command": command, "payload": payload})
        })
}

/// Everything a SUB socket receives from the bus's event address while it
/// runs: how many events came, and each body that broke dgbit's contract.
struct EventWatch {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(usize, Vec<String>)>>,
}

impl EventWatch {
    fn start(url: &str) -> EventWatch {
        let socket = nng::Socket::new(nng::Protocol::Sub0).expect("a SUB socket");
        socket
            .set_opt::<nng::options::protocol::pubsub::Subscribe>(Vec::new())
            .expect("subscribe to everything");
        socket
            .set_opt::<nng::options::RecvTimeout>(Some(Duration::from_millis(100)))
            .expect("a receive timeout");
        socket.dial(url).expect("dial the event address");
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut seen, mut broken) = (0, Vec::new());
            loop {
                match socket.recv() {
                    Ok(body) => {
                        seen += 1;
                        if let Err(problem) = check_event(&body) {
                            broken.push(problem);
                        }
                    }
                    Err(_) if stopping.load(Ordering::Acquire) => break,
                    Err(_) => {}
                }
            }
            (seen, broken)
        });
        EventWatch {
            stop,
            thread: Some(thread),
        }
    }

    /// Stop once the socket has been quiet for a moment; what it saw.
    fn finish(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Release);
        let thread = self.thread.take().expect("finished once");
        thread.join().expect("the watcher did not panic")
    }
}

/// An event body as dgbit's Python `Event(**json)` needs it: compact, the
/// five keys at most, `event_type` first.
fn check_event(body: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(body);
    let event = Event::decode(body, 0).map_err(|err| format!("{err}: {text}"))?;
    if !text.starts_with("{\"event_type\":") {
        return Err(format!("event_type is not first: {text}"));
    }
    if event.event_type.is_empty() {
        return Err(format!("empty event_type: {text}"));
    }
    Ok(())
}

#[test]
fn hostile_event_and_job_queue_commands_get_coded_replies_and_events_keep_their_shape() {
    let bus = LiveBus::start();
    let watch = EventWatch::start(&bus.addresses.addresses.event);
    let mut runner = TestRunner::new(config(LIVE_CASES));
    let outcomes = RefCell::new(BTreeMap::<String, usize>::new());
    let result = runner.run(&bus_request(), |request| {
        let body = serde_json::to_vec(&request).expect("serialises");
        let raw = bus.send(&body);
        let reply = CommandReply::decode(&raw).map_err(|err| {
            TestCaseError::fail(format!("malformed reply {}: {err}", preview(&raw)))
        })?;
        let command = request["command"].as_str().unwrap_or_default();
        let outcome = reply.code().unwrap_or("ok").to_string();
        if let Some(code) = reply.code() {
            prop_assert!(
                KNOWN_CODES.contains(&code),
                "{command} answered an unknown code: {}",
                preview(&raw)
            );
        }
        *outcomes
            .borrow_mut()
            .entry(format!("{command} {outcome}"))
            .or_default() += 1;
        let pong = CommandReply::decode(&bus.send(br#"{"command": "ping"}"#)).unwrap();
        prop_assert!(pong.is_ok(), "ping after {} failed", preview(&body));
        Ok(())
    });
    let alive = bus.serve.borrow_mut().child.try_wait().unwrap().is_none();
    let (events, broken) = watch.finish();
    eprintln!(
        "hostile bus.* commands: {:?}; {events} events seen by a SUB peer, {} broken",
        outcomes.borrow(),
        broken.len()
    );
    if let Err(failure) = result {
        panic!("{failure}");
    }
    assert!(alive, "dgbit-bus serve exited");
    assert!(
        broken.is_empty(),
        "events that break dgbit's contract: {broken:?}"
    );
    assert!(events > 0, "no event reached the SUB peer");
}

#[test]
fn every_bus_corpus_file_gets_its_named_reply_from_a_live_bus() {
    let files = corpus("bus");
    assert!(!files.is_empty(), "the bus corpus is empty");
    let bus = LiveBus::start();
    for (name, expected, body) in &files {
        let raw = bus.send(body);
        let reply = CommandReply::decode(&raw)
            .unwrap_or_else(|err| panic!("{name}: malformed reply {}: {err}", preview(&raw)));
        assert_eq!(
            reply.code(),
            expected.as_deref(),
            "{name}: {}",
            preview(&raw)
        );
        let pong = CommandReply::decode(&bus.send(br#"{"command": "ping"}"#)).unwrap();
        assert!(pong.is_ok(), "ping after {name}");
    }
    eprintln!("bus corpus: {} files replayed", files.len());
}
