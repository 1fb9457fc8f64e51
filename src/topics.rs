//! The event topics of dgbit's service bus and the patterns that select them.
//!
//! A topic is a dot-separated name such as `job.completed`; its parts are
//! *segments*. The constants below are the topics DESIGN.md lists; the bus
//! publishes any other topic too, so they are a vocabulary, not a limit.
//!
//! A [`Pattern`] picks topics for a subscriber. Matching always follows whole
//! segments, never raw string prefixes:
//!
//! | pattern | matches | does not match |
//! |---|---|---|
//! | `job.completed` | `job.completed` | `job.completed_late`, `job` |
//! | `job.*` | `job.created`, `job.progress.step` | `job`, `jobs.archived` |
//! | `*.failed` | `job.failed`, `data.sync.failed` | `failed`, `job.failed_twice` |
//! | `*` | every topic | nothing |
//!
//! `job.*` needs at least one segment after `job`, so the bare topic `job` is
//! not "under" it; likewise `*.failed` needs at least one segment before
//! `failed`. A wildcard is a whole segment at the start or the end, never
//! both and never in the middle: `a.*.b`, `**`, `job*` and `*.*` are refused
//! with a [`PatternError`].

use std::fmt;
use std::str::FromStr;

/// A job was accepted by the bus.
pub const JOB_CREATED: &str = "job.created";
/// A job entered the queue, or re-entered it (a retry, a lost lease).
pub const JOB_QUEUED: &str = "job.queued";
/// The bus handed a job to a worker (a lease, a push or an in-process
/// handler).
pub const JOB_STARTED: &str = "job.started";
/// A worker reported progress on a job.
pub const JOB_PROGRESS: &str = "job.progress";
/// A job finished successfully.
pub const JOB_COMPLETED: &str = "job.completed";
/// An attempt at a job failed (it is retried, or dead-lettered after its
/// last retry).
pub const JOB_FAILED: &str = "job.failed";
/// A job was cancelled.
pub const JOB_CANCELLED: &str = "job.cancelled";
/// A strategy produced a trade signal.
pub const TRADE_SIGNAL: &str = "trade.signal";
/// A position was entered.
pub const TRADE_ENTERED: &str = "trade.entered";
/// A position was exited.
pub const TRADE_EXITED: &str = "trade.exited";
/// A position changed.
pub const TRADE_UPDATED: &str = "trade.updated";
/// Trading failed.
pub const TRADE_ERROR: &str = "trade.error";
/// A signal was generated.
pub const SIGNAL_GENERATED: &str = "signal.generated";
/// Market data was fetched.
pub const DATA_FETCHED: &str = "data.fetched";
/// Market data was cached.
pub const DATA_CACHED: &str = "data.cached";
/// Fetching or caching data failed.
pub const DATA_ERROR: &str = "data.error";
/// A service came up.
pub const SERVICE_STARTED: &str = "service.started";
/// A service went down.
pub const SERVICE_STOPPED: &str = "service.stopped";
/// A health check was requested or answered.
pub const HEALTH_CHECK: &str = "health.check";
/// The bus's periodic counters.
pub const SYSTEM_HEALTH: &str = "system.health";
/// Something needs an operator: restarts, give-ups, backlog, drops.
pub const SYSTEM_ALERT: &str = "system.alert";

/// Every topic of DESIGN.md, in its order.
pub const ALL: [&str; 21] = [
    JOB_CREATED,
    JOB_QUEUED,
    JOB_STARTED,
    JOB_PROGRESS,
    JOB_COMPLETED,
    JOB_FAILED,
    JOB_CANCELLED,
    TRADE_SIGNAL,
    TRADE_ENTERED,
    TRADE_EXITED,
    TRADE_UPDATED,
    TRADE_ERROR,
    SIGNAL_GENERATED,
    DATA_FETCHED,
    DATA_CACHED,
    DATA_ERROR,
    SERVICE_STARTED,
    SERVICE_STOPPED,
    HEALTH_CHECK,
    SYSTEM_HEALTH,
    SYSTEM_ALERT,
];

const WILDCARD: &str = "*";
const SEPARATOR: char = '.';

/// Whether `topic` can be published: non-empty segments, no wildcard.
///
/// `job.completed` and `custom` are topics; `job.*`, `job..x` and `.job` are
/// not.
pub fn is_topic(topic: &str) -> bool {
    !topic.is_empty()
        && topic
            .split(SEPARATOR)
            .all(|segment| !segment.is_empty() && !segment.contains('*'))
}

/// Why a text is not a pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// The pattern is the empty string.
    #[error("an event pattern must not be empty")]
    Empty,
    /// Two dots in a row, or a dot at either end (`job..x`, `.job`, `job.`).
    #[error("event pattern `{pattern}` has an empty segment")]
    EmptySegment {
        /// The refused pattern.
        pattern: String,
    },
    /// A `*` that is not a whole segment (`job*`, `**`).
    #[error("event pattern `{pattern}`: `*` must be a whole segment, not part of `{segment}`")]
    PartialWildcard {
        /// The refused pattern.
        pattern: String,
        /// The segment that holds the `*`.
        segment: String,
    },
    /// A `*` segment between two others (`a.*.b`).
    #[error("event pattern `{pattern}`: `*` may only be the first or the last segment")]
    InnerWildcard {
        /// The refused pattern.
        pattern: String,
    },
    /// A `*` segment at both ends (`*.*`, `*.job.*`).
    #[error("event pattern `{pattern}` has a wildcard at both ends")]
    WildcardAtBothEnds {
        /// The refused pattern.
        pattern: String,
    },
}

/// What a [`Pattern`] selects. Read it with [`Pattern::kind`]; build a
/// pattern only by parsing, so that every pattern is valid.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PatternKind {
    /// `*`: every topic.
    All,
    /// A topic without wildcard: that topic only.
    Exact(String),
    /// `job.*` (held as `job`): topics whose leading segments are these,
    /// followed by at least one more.
    Under(String),
    /// `*.failed` (held as `failed`): topics whose trailing segments are
    /// these, preceded by at least one more.
    EndsWith(String),
}

/// A subscriber's choice of topics; see the [module docs](self) for the
/// matching rules.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pattern {
    text: String,
    kind: PatternKind,
}

impl Pattern {
    /// The pattern that matches every topic.
    pub fn all() -> Self {
        Self {
            text: WILDCARD.to_string(),
            kind: PatternKind::All,
        }
    }

    /// Parse `text` as a pattern.
    ///
    /// # Errors
    ///
    /// [`PatternError::Empty`] for `""`; [`PatternError::EmptySegment`] for a
    /// leading, trailing or doubled dot; [`PatternError::PartialWildcard`]
    /// for `*` inside a segment; [`PatternError::InnerWildcard`] for `*`
    /// between segments; [`PatternError::WildcardAtBothEnds`] for `*.x.*`.
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        if text.is_empty() {
            return Err(PatternError::Empty);
        }
        let segments: Vec<&str> = text.split(SEPARATOR).collect();
        check_segments(text, &segments)?;

        let last = segments.len() - 1;
        let leading = segments[0] == WILDCARD;
        let trailing = segments[last] == WILDCARD;
        let kind = match (leading, trailing) {
            (true, true) if last == 0 => PatternKind::All,
            (true, true) => {
                return Err(PatternError::WildcardAtBothEnds {
                    pattern: text.to_string(),
                })
            }
            (false, true) => PatternKind::Under(segments[..last].join(".")),
            (true, false) => PatternKind::EndsWith(segments[1..].join(".")),
            (false, false) => PatternKind::Exact(text.to_string()),
        };
        Ok(Self {
            text: text.to_string(),
            kind,
        })
    }

    /// What this pattern selects.
    pub fn kind(&self) -> &PatternKind {
        &self.kind
    }

    /// The pattern as it was written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `topic` is selected by this pattern, segment by segment.
    pub fn matches(&self, topic: &str) -> bool {
        match &self.kind {
            PatternKind::All => true,
            PatternKind::Exact(exact) => topic == exact,
            PatternKind::Under(prefix) => topic
                .strip_prefix(prefix.as_str())
                .and_then(|rest| rest.strip_prefix(SEPARATOR))
                .is_some_and(|rest| !rest.is_empty()),
            PatternKind::EndsWith(suffix) => topic
                .strip_suffix(suffix.as_str())
                .and_then(|rest| rest.strip_suffix(SEPARATOR))
                .is_some_and(|rest| !rest.is_empty()),
        }
    }
}

/// Every segment non-empty; a `*` only as a whole segment at either end.
fn check_segments(text: &str, segments: &[&str]) -> Result<(), PatternError> {
    let last = segments.len() - 1;
    for (index, segment) in segments.iter().enumerate() {
        if segment.is_empty() {
            return Err(PatternError::EmptySegment {
                pattern: text.to_string(),
            });
        }
        if *segment == WILDCARD {
            if index != 0 && index != last {
                return Err(PatternError::InnerWildcard {
                    pattern: text.to_string(),
                });
            }
        } else if segment.contains('*') {
            return Err(PatternError::PartialWildcard {
                pattern: text.to_string(),
                segment: segment.to_string(),
            });
        }
    }
    Ok(())
}

impl FromStr for Pattern {
    type Err = PatternError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str) -> Pattern {
        Pattern::parse(text).unwrap_or_else(|err| panic!("{text}: {err}"))
    }

    #[test]
    fn the_pattern_table_follows_segments() {
        // (pattern, topic, expected)
        let table = [
            ("job.completed", "job.completed", true),
            ("job.completed", "job.completed_late", false),
            ("job.completed", "job", false),
            ("trade.entered", "trade.entered", true),
            ("trade.entered", "trade.entered_late", false),
            ("trade.entered", "trade.entered.partial", false),
            ("job.*", "job.created", true),
            ("job.*", "job.progress.step", true),
            ("job.*", "job", false),
            ("job.*", "jobs.archived", false),
            ("job.*", "job_x.created", false),
            ("job.*", "trade.job", false),
            ("job.*", "job.", false),
            ("trade.signal.*", "trade.signal.buy", true),
            ("trade.signal.*", "trade.signal", false),
            ("trade.signal.*", "trade.signals.buy", false),
            ("*", "job.completed", true),
            ("*", "custom", true),
            ("*.failed", "job.failed", true),
            ("*.failed", "data.sync.failed", true),
            ("*.failed", "failed", false),
            ("*.failed", "job.failed_twice", false),
            ("*.failed", "job.notfailed", false),
            ("*.failed", ".failed", false),
            ("*.sync.failed", "data.sync.failed", true),
            ("*.sync.failed", "data.async.failed", false),
        ];
        for (text, topic, expected) in table {
            assert_eq!(
                pattern(text).matches(topic),
                expected,
                "pattern `{text}` against topic `{topic}`"
            );
        }
    }

    #[test]
    fn every_design_topic_is_matched_by_its_own_name_and_by_star() {
        for topic in ALL {
            assert!(is_topic(topic), "{topic}");
            assert!(pattern(topic).matches(topic), "{topic}");
            assert!(Pattern::all().matches(topic), "{topic}");
        }
    }

    #[test]
    fn job_star_selects_exactly_the_seven_job_topics() {
        let job = pattern("job.*");
        let selected: Vec<&str> = ALL.into_iter().filter(|t| job.matches(t)).collect();
        assert_eq!(
            selected,
            [
                JOB_CREATED,
                JOB_QUEUED,
                JOB_STARTED,
                JOB_PROGRESS,
                JOB_COMPLETED,
                JOB_FAILED,
                JOB_CANCELLED
            ]
        );
    }

    #[test]
    fn invalid_patterns_are_refused_with_their_reason() {
        let owned = |text: &str| text.to_string();
        let table = [
            ("", PatternError::Empty),
            (
                "a.*.b",
                PatternError::InnerWildcard {
                    pattern: owned("a.*.b"),
                },
            ),
            (
                "**",
                PatternError::PartialWildcard {
                    pattern: owned("**"),
                    segment: owned("**"),
                },
            ),
            (
                "job*",
                PatternError::PartialWildcard {
                    pattern: owned("job*"),
                    segment: owned("job*"),
                },
            ),
            (
                "*.*",
                PatternError::WildcardAtBothEnds {
                    pattern: owned("*.*"),
                },
            ),
            (
                "job..x",
                PatternError::EmptySegment {
                    pattern: owned("job..x"),
                },
            ),
            (
                ".job",
                PatternError::EmptySegment {
                    pattern: owned(".job"),
                },
            ),
            (
                "job.",
                PatternError::EmptySegment {
                    pattern: owned("job."),
                },
            ),
        ];
        for (text, expected) in table {
            assert_eq!(Pattern::parse(text), Err(expected), "pattern `{text}`");
        }
    }

    #[test]
    fn a_pattern_keeps_its_text_and_kind() {
        let under = pattern("job.*");
        assert_eq!(under.to_string(), "job.*");
        assert_eq!(under.kind(), &PatternKind::Under("job".into()));
        assert_eq!(
            pattern("*.failed").kind(),
            &PatternKind::EndsWith("failed".into())
        );
        assert_eq!(pattern("*"), Pattern::all());
        assert_eq!(
            "trade.entered".parse::<Pattern>(),
            Ok(pattern("trade.entered"))
        );
    }

    #[test]
    fn only_wildcard_free_dotted_names_are_topics() {
        assert!(is_topic("custom"));
        assert!(!is_topic(""));
        assert!(!is_topic("job.*"));
        assert!(!is_topic("job..x"));
        assert!(!is_topic("job."));
    }
}
