//! Reading command and job payloads.
//!
//! Every field is type-checked and every failure is a `bad_request` that names
//! the field, what it must be and what it was. A field set to `null` counts as
//! absent, because Python clients send `None` for "not given".

use dgbit_bus::message::HandlerError;
use serde_json::{Map, Value};

use crate::klines::Bar;

/// A JSON object payload, as carried by commands and jobs.
pub type Payload = Map<String, Value>;

/// Which bars a request asks for: `{"symbol": "EURUSD", "interval": "60",
/// "limit": 1000}`.
///
/// - `symbol`: a string, required.
/// - `interval`: a string, required; a non-negative integer is accepted too
///   and read as its decimal text (`60` means `"60"`).
/// - `limit`: optional positive integer, the number of most recent bars to
///   use; absent means all bars.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesRequest {
    /// The symbol as sent; the store upper-cases it.
    pub symbol: String,
    /// The interval as sent (a whole number as its text).
    pub interval: String,
    /// How many of the most recent bars to use; `None` for all.
    pub limit: Option<usize>,
}

impl SeriesRequest {
    /// Read a series request from a payload.
    ///
    /// # Errors
    ///
    /// `bad_request` when `symbol` or `interval` is missing or of the wrong
    /// type, or `limit` is not a positive integer.
    pub fn from_payload(payload: &Payload) -> Result<Self, HandlerError> {
        Ok(Self {
            symbol: required_string(payload, "symbol")?,
            interval: interval(payload)?,
            limit: positive_integer(payload, "limit")?,
        })
    }

    /// The most recent `limit` bars of `bars` (all of them without a limit),
    /// still oldest first.
    pub fn select<'a>(&self, bars: &'a [Bar]) -> &'a [Bar] {
        let keep = self.limit.map_or(bars.len(), |limit| limit.min(bars.len()));
        &bars[bars.len() - keep..]
    }
}

/// The string field `key`.
///
/// # Errors
///
/// `bad_request` when it is missing, null or not a string.
pub fn required_string(payload: &Payload, key: &str) -> Result<String, HandlerError> {
    match present(payload, key) {
        None => Err(HandlerError::bad_request(format!(
            "payload field `{key}` is required"
        ))),
        Some(Value::String(text)) => Ok(text.clone()),
        Some(other) => Err(wrong_type(key, "a string", other)),
    }
}

fn interval(payload: &Payload) -> Result<String, HandlerError> {
    match present(payload, "interval") {
        Some(Value::String(text)) => Ok(text.clone()),
        Some(value) => value
            .as_u64()
            .map(|minutes| minutes.to_string())
            .ok_or_else(|| wrong_type("interval", "a string or whole number", value)),
        None => Err(HandlerError::bad_request(
            "payload field `interval` is required",
        )),
    }
}

/// The optional field `key` as a positive integer.
///
/// # Errors
///
/// `bad_request` when it is present but not an integer of at least 1.
pub fn positive_integer(payload: &Payload, key: &str) -> Result<Option<usize>, HandlerError> {
    let Some(value) = present(payload, key) else {
        return Ok(None);
    };
    match value.as_u64().and_then(|n| usize::try_from(n).ok()) {
        Some(n) if n >= 1 => Ok(Some(n)),
        _ => Err(wrong_type(key, "a positive integer", value)),
    }
}

/// The optional field `key` as a finite number.
///
/// # Errors
///
/// `bad_request` when it is present but not a number.
pub fn number(payload: &Payload, key: &str) -> Result<Option<f64>, HandlerError> {
    let Some(value) = present(payload, key) else {
        return Ok(None);
    };
    value
        .as_f64()
        .map(Some)
        .ok_or_else(|| wrong_type(key, "a number", value))
}

fn present<'a>(payload: &'a Payload, key: &str) -> Option<&'a Value> {
    payload.get(key).filter(|value| !value.is_null())
}

fn wrong_type(key: &str, expected: &str, got: &Value) -> HandlerError {
    HandlerError::bad_request(format!(
        "payload field `{key}` must be {expected}, got {got}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn payload(value: Value) -> Payload {
        value.as_object().cloned().unwrap()
    }

    fn bar(time: &str) -> Bar {
        Bar {
            time: time.into(),
            open: 1.0,
            high: 1.0,
            low: 1.0,
            close: 1.0,
            volume: 0.0,
        }
    }

    #[test]
    fn a_seed_shaped_payload_reads_symbol_interval_and_limit() {
        let request = SeriesRequest::from_payload(&payload(
            json!({"symbol": "EURUSD", "interval": "60", "limit": 1000}),
        ))
        .unwrap();
        assert_eq!(
            request,
            SeriesRequest {
                symbol: "EURUSD".into(),
                interval: "60".into(),
                limit: Some(1000)
            }
        );
    }

    #[test]
    fn a_whole_number_interval_reads_as_its_text_and_a_null_limit_as_none() {
        let request = SeriesRequest::from_payload(&payload(
            json!({"symbol": "EURUSD", "interval": 60, "limit": null}),
        ))
        .unwrap();
        assert_eq!((request.interval.as_str(), request.limit), ("60", None));
    }

    #[test]
    fn each_malformed_field_is_a_bad_request_naming_it() {
        let cases = [
            (json!({"interval": "60"}), "`symbol` is required"),
            (
                json!({"symbol": 5, "interval": "60"}),
                "`symbol` must be a string, got 5",
            ),
            (json!({"symbol": "A"}), "`interval` is required"),
            (
                json!({"symbol": "A", "interval": 1.5}),
                "`interval` must be a string or whole",
            ),
            (
                json!({"symbol": "A", "interval": true}),
                "`interval` must be a string or whole",
            ),
            (
                json!({"symbol": "A", "interval": "1", "limit": 0}),
                "`limit` must be a positive",
            ),
            (
                json!({"symbol": "A", "interval": "1", "limit": -3}),
                "`limit` must be a positive",
            ),
            (
                json!({"symbol": "A", "interval": "1", "limit": "9"}),
                "`limit` must be a positive",
            ),
            (
                json!({"symbol": "A", "interval": "1", "limit": 2.5}),
                "`limit` must be a positive",
            ),
        ];
        for (body, expected) in cases {
            let err = SeriesRequest::from_payload(&payload(body.clone())).unwrap_err();
            assert_eq!(err.code, "bad_request", "{body}");
            assert!(err.message.contains(expected), "{body}: {}", err.message);
        }
    }

    #[test]
    fn select_keeps_the_most_recent_bars_oldest_first() {
        let bars = [bar("a"), bar("b"), bar("c")];
        let mut request = SeriesRequest {
            symbol: "X".into(),
            interval: "1".into(),
            limit: None,
        };
        assert_eq!(request.select(&bars).len(), 3);
        request.limit = Some(2);
        let times: Vec<&str> = request
            .select(&bars)
            .iter()
            .map(|b| b.time.as_str())
            .collect();
        assert_eq!(times, ["b", "c"]);
        request.limit = Some(10);
        assert_eq!(request.select(&bars).len(), 3);
    }

    #[test]
    fn a_number_field_rejects_text() {
        let body = payload(json!({"fee": "0.1", "rate": 0.5}));
        assert_eq!(number(&body, "rate").unwrap(), Some(0.5));
        assert_eq!(number(&body, "absent").unwrap(), None);
        assert_eq!(number(&body, "fee").unwrap_err().code, "bad_request");
    }
}
