//! The payloads of the dispatcher's `bus.*` commands, parsed into the
//! queue's types and back. See the `dispatcher` module docs for the shapes.

use std::time::Duration;

use serde_json::{json, Map, Value};

use super::queue::{Grant, LeaseRequest, Report, ReportOutcome, ReportState};
use crate::message::{optional_u64, HandlerError};
use crate::wire::{JobMessage, Priority, DEFAULT_MAX_RETRIES};

/// The job of a `bus.enqueue` payload: a whole 7-key job when the payload
/// has `job_id`, else built from `job_type`, `payload`, `priority` and
/// `max_retries`.
///
/// # Errors
///
/// `bad_request` naming the first missing or mistyped field.
pub fn enqueue_job(payload: Map<String, Value>) -> Result<JobMessage, HandlerError> {
    if payload.contains_key("job_id") {
        return JobMessage::from_value(Value::Object(payload))
            .map_err(|err| HandlerError::bad_request(err.message));
    }
    let job_type = required_str(&payload, "job_type")?;
    let body = match payload.get("payload") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(Value::Object(map)) => Value::Object(map.clone()),
        Some(_) => return Err(HandlerError::bad_request("`payload` must be an object")),
    };
    let priority = match payload.get("priority") {
        None | Some(Value::Null) => Priority::Normal,
        Some(value) => Priority::from_json(value)
            .ok_or_else(|| HandlerError::bad_request("`priority` must be 0, 1 or 2"))?,
    };
    let max_retries = match optional_u64(&payload, "max_retries")? {
        None => DEFAULT_MAX_RETRIES,
        Some(n) => u32::try_from(n)
            .map_err(|_| HandlerError::bad_request("`max_retries` must be a whole number"))?,
    };
    Ok(JobMessage::new(job_type, body)
        .with_priority(priority)
        .with_max_retries(max_retries))
}

/// A `bus.lease` payload; `wait_ms` is clamped to `max_wait`.
///
/// # Errors
///
/// `bad_request` for a missing `worker` or mistyped field.
pub fn lease_request(
    payload: &Map<String, Value>,
    max_wait: Duration,
) -> Result<LeaseRequest, HandlerError> {
    let worker = required_str(payload, "worker")?;
    let job_types = match payload.get("job_types") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => Some(
            items
                .iter()
                .map(|item| item.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| HandlerError::bad_request("`job_types` must be strings"))?,
        ),
        Some(_) => return Err(HandlerError::bad_request("`job_types` must be a list")),
    };
    let wait = Duration::from_millis(optional_u64(payload, "wait_ms")?.unwrap_or(0));
    Ok(LeaseRequest {
        worker,
        job_types,
        wait: wait.min(max_wait),
    })
}

/// The reply to `bus.lease`.
pub fn lease_reply(grant: Option<Grant>) -> Value {
    match grant {
        Some(grant) => json!({"job": grant.job.to_value(), "lease_ms": grant.lease_ms,
                              "lease_id": grant.lease_id}),
        None => json!({"job": null}),
    }
}

/// A `bus.report` payload.
///
/// # Errors
///
/// `bad_request` for a missing `worker`, `job_id` or `state`, or a `state`
/// outside `started`, `progress`, `heartbeat`, `completed`, `failed`.
pub fn report(payload: &Map<String, Value>) -> Result<Report, HandlerError> {
    let worker = required_str(payload, "worker")?;
    let job_id = required_str(payload, "job_id")?;
    let lease_id = optional_u64(payload, "lease_id")?;
    let field = |key: &str| payload.get(key).cloned().unwrap_or(Value::Null);
    let state = match required_str(payload, "state")?.as_str() {
        "started" => ReportState::Started,
        "heartbeat" => ReportState::Heartbeat,
        "progress" => ReportState::Progress(field("progress")),
        "completed" => ReportState::Completed(field("result")),
        "failed" => ReportState::Failed(match payload.get("error") {
            Some(Value::String(text)) => text.clone(),
            None | Some(Value::Null) => "the worker reported a failure without a reason".into(),
            Some(other) => other.to_string(),
        }),
        other => {
            return Err(HandlerError::bad_request(format!(
                "`state` must be started, progress, heartbeat, completed or failed, not `{other}`"
            )))
        }
    };
    Ok(Report {
        worker,
        job_id,
        lease_id,
        state,
    })
}

/// The lease a final report asks for in the same round trip: its payload's
/// `next` object, read as a `bus.lease` payload of the reporting worker
/// that does not wait (`wait_ms` is ignored). Holding the reply for a job
/// would hold the report's acknowledgement with it, and a reply lost while
/// held would leave the worker unsure whether its report counted. `None`
/// when there is no `next`.
///
/// # Errors
///
/// `bad_request` when `next` is not an object, goes with a report that is
/// not `completed` or `failed`, or has a mistyped field.
pub fn next_lease(
    payload: &Map<String, Value>,
    report: &Report,
) -> Result<Option<LeaseRequest>, HandlerError> {
    let next = match payload.get("next") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(next)) => next,
        Some(_) => return Err(HandlerError::bad_request("`next` must be an object")),
    };
    if !matches!(
        report.state,
        ReportState::Completed(_) | ReportState::Failed(_)
    ) {
        return Err(HandlerError::bad_request(
            "`next` goes only with a `completed` or `failed` report",
        ));
    }
    let mut lease = next.clone();
    lease.insert("worker".into(), Value::String(report.worker.clone()));
    lease_request(&lease, Duration::ZERO).map(Some)
}

/// The reply to `bus.report`.
pub fn report_reply(outcome: ReportOutcome) -> Value {
    match outcome {
        ReportOutcome::Accepted => json!({"accepted": true}),
        ReportOutcome::Ignored { reason } => json!({"accepted": false, "reason": reason}),
    }
}

/// The `job_id` of a `bus.cancel` payload.
///
/// # Errors
///
/// `bad_request` when `job_id` is missing or not a string.
pub fn job_id(payload: &Map<String, Value>) -> Result<String, HandlerError> {
    required_str(payload, "job_id")
}

fn required_str(payload: &Map<String, Value>, key: &str) -> Result<String, HandlerError> {
    match payload.get(key) {
        Some(Value::String(text)) if !text.is_empty() => Ok(text.clone()),
        _ => Err(HandlerError::bad_request(format!(
            "`{key}` must be a non-empty string"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap()
    }

    #[test]
    fn an_enqueue_payload_builds_a_fresh_job() {
        let job = enqueue_job(object(json!({"job_type": "fetch", "payload": {"s": 1},
                                            "priority": 2, "max_retries": 5})))
        .unwrap();
        assert_eq!(job.job_type, "fetch");
        assert_eq!(job.priority, Priority::Urgent);
        assert_eq!(job.max_retries, 5);
        assert_eq!(job.retry_count, 0);
    }

    #[test]
    fn a_whole_job_is_taken_as_it_is_and_must_have_seven_keys() {
        let job = JobMessage::new("fetch", json!({}));
        let same = enqueue_job(object(job.to_value())).unwrap();
        assert_eq!(same, job);
        let mut extra = object(job.to_value());
        extra.insert("extra".into(), json!(1));
        assert!(enqueue_job(extra).is_err());
    }

    #[test]
    fn a_lease_wait_is_clamped_to_the_maximum() {
        let request = lease_request(
            &object(json!({"worker": "w", "wait_ms": 60000})),
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(request.wait, Duration::from_secs(5));
        assert_eq!(request.job_types, None);
    }

    #[test]
    fn a_report_with_an_unknown_state_is_a_bad_request() {
        let err = report(&object(
            json!({"worker": "w", "job_id": "j", "state": "done"}),
        ))
        .unwrap_err();
        assert_eq!(err.code, "bad_request");
    }
}
