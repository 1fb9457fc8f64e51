//! Candlestick ("kline") series read from CSV files and cached in memory.
//!
//! # Where a series lives
//!
//! A [`KlineStore`] reads one directory. Each series is one file named
//! `<SYMBOL>_<INTERVAL>.csv`:
//!
//! - `SYMBOL` is the symbol upper-cased (`eurusd` finds `EURUSD_60.csv`);
//! - `INTERVAL` is the interval exactly as the client sends it. dgbit uses
//!   Bybit's codes: `"1"` .. `"720"` are minutes, `"D"`, `"W"` and `"M"` a day,
//!   a week and a month. The interval is not case-folded, because elsewhere
//!   `m` and `M` mean a minute and a month.
//!
//! Both parts may hold only ASCII letters and digits, so a request can never
//! name a path outside the directory. There are no aliases: `BTCUSDT` does
//! not find `BTCUSD_M.csv`. The crate ships two fixtures under
//! `fixtures/klines/`: `EURUSD_60.csv` (5000 hourly bars, 2017-04-19 ..
//! 2018-02-07) and `BTCUSD_M.csv` (156 monthly bars, 2012-01 .. 2024-12).
//!
//! # File format
//!
//! The first line is the header `,Open,High,Low,Close,Volume` (the first
//! column's name is free, the others are matched without regard to case).
//! Every further line is one bar: its time as text, then open, high, low,
//! close and volume. Prices must be finite and above zero, volume finite and
//! not negative, and times strictly ascending when compared as text (ISO 8601
//! times sort that way). Blank lines are skipped. Any other line is an error
//! naming the file and the line number.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use dgbit_bus::message::HandlerError;
use dgbit_bus::wire::code;
use serde::Serialize;

/// The column names the header must carry after the time column.
const VALUE_COLUMNS: [&str; 5] = ["open", "high", "low", "close", "volume"];

/// One bar: its time as written in the file and its five values.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bar {
    /// The bar's time, as text from the file's first column.
    pub time: String,
    /// The first traded price of the bar.
    pub open: f64,
    /// The highest traded price.
    pub high: f64,
    /// The lowest traded price.
    pub low: f64,
    /// The last traded price.
    pub close: f64,
    /// The traded volume, in the file's unit.
    pub volume: f64,
}

/// Why a series could not be served.
#[derive(Debug, thiserror::Error)]
pub enum KlineError {
    /// A symbol or interval holds something other than ASCII letters and
    /// digits, or is empty.
    #[error("{field} {value:?} is not valid: use only ASCII letters and digits")]
    InvalidName {
        /// `"symbol"` or `"interval"`.
        field: &'static str,
        /// What the request held.
        value: String,
    },

    /// No file for this symbol and interval.
    #[error(
        "no klines for symbol {symbol} interval {interval:?} (looked for {file}); available: {}",
        describe_catalog(.available)
    )]
    NotFound {
        /// The symbol asked for, upper-cased.
        symbol: String,
        /// The interval asked for.
        interval: String,
        /// The file name that was looked for.
        file: String,
        /// Every symbol in the directory with its intervals.
        available: BTreeMap<String, Vec<String>>,
    },

    /// The directory or a file could not be read.
    #[error("cannot read {}: {source}", .path.display())]
    Io {
        /// The directory or file.
        path: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },

    /// A line of a file is not a valid bar or header.
    #[error("{}:{line}: {reason}", .path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// What is wrong with the line.
        reason: String,
    },
}

impl KlineError {
    /// The reply code: `bad_request`, `not_found` or `handler_failed`.
    pub fn code(&self) -> &'static str {
        match self {
            KlineError::InvalidName { .. } => code::BAD_REQUEST,
            KlineError::NotFound { .. } => code::NOT_FOUND,
            KlineError::Io { .. } | KlineError::Parse { .. } => code::HANDLER_FAILED,
        }
    }
}

impl From<KlineError> for HandlerError {
    fn from(err: KlineError) -> Self {
        HandlerError::new(err.code(), err.to_string())
    }
}

fn describe_catalog(catalog: &BTreeMap<String, Vec<String>>) -> String {
    if catalog.is_empty() {
        return "none".to_string();
    }
    let entries: Vec<String> = catalog
        .iter()
        .map(|(symbol, intervals)| format!("{symbol} [{}]", intervals.join(", ")))
        .collect();
    entries.join(", ")
}

/// The file name that holds `symbol` at `interval`: `<SYMBOL>_<INTERVAL>.csv`.
///
/// # Errors
///
/// [`KlineError::InvalidName`] when either part is empty or holds anything
/// but ASCII letters and digits.
pub fn file_name(symbol: &str, interval: &str) -> Result<String, KlineError> {
    let key = SeriesKey::new(symbol, interval)?;
    Ok(key.file_name())
}

/// A validated symbol (upper-cased) and interval.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SeriesKey {
    symbol: String,
    interval: String,
}

impl SeriesKey {
    fn new(symbol: &str, interval: &str) -> Result<Self, KlineError> {
        Ok(Self {
            symbol: checked_name("symbol", symbol)?.to_ascii_uppercase(),
            interval: checked_name("interval", interval)?.to_string(),
        })
    }

    fn file_name(&self) -> String {
        format!("{}_{}.csv", self.symbol, self.interval)
    }

    /// Recognise a file name of the store's pattern; anything else is `None`.
    fn from_file_name(name: &str) -> Option<Self> {
        let stem = name.strip_suffix(".csv")?;
        let (symbol, interval) = stem.split_once('_')?;
        let key = Self::new(symbol, interval).ok()?;
        // A lower-case file name would never be looked up, so do not list it.
        (key.symbol == symbol).then_some(key)
    }
}

fn checked_name<'a>(field: &'static str, value: &'a str) -> Result<&'a str, KlineError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(KlineError::InvalidName {
            field,
            value: value.to_string(),
        });
    }
    Ok(value)
}

/// What the cache holds and how often it served a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CacheStatus {
    /// Series held.
    pub entries: usize,
    /// Bars held, over all series.
    pub bars: usize,
    /// Lookups served from the cache since the store was made.
    pub hits: u64,
    /// Lookups that had to read a file (successfully or not).
    pub misses: u64,
}

/// Bars from a directory of `<SYMBOL>_<INTERVAL>.csv` files, each file parsed
/// once and then kept in memory until [`KlineStore::clear_cache`].
///
/// The store is `Sync`: share one behind an `Arc` between actors, so that
/// the data bus and the backtester read each file once between them.
#[derive(Debug)]
pub struct KlineStore {
    dir: PathBuf,
    cache: Mutex<HashMap<SeriesKey, Arc<[Bar]>>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl KlineStore {
    /// A store reading `dir`. Nothing is read until the first lookup.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            cache: Mutex::new(HashMap::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// A store reading this crate's `fixtures/klines` directory.
    pub fn fixtures() -> Self {
        Self::new(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fixtures")
                .join("klines"),
        )
    }

    /// The directory this store reads.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// All bars of `symbol` at `interval`, oldest first.
    ///
    /// # Errors
    ///
    /// [`KlineError::InvalidName`] for a malformed symbol or interval,
    /// [`KlineError::NotFound`] when there is no such file,
    /// [`KlineError::Io`] when the file or directory cannot be read, and
    /// [`KlineError::Parse`] for a malformed line.
    pub fn series(&self, symbol: &str, interval: &str) -> Result<Arc<[Bar]>, KlineError> {
        let key = SeriesKey::new(symbol, interval)?;
        if let Some(bars) = self.lock_cache().get(&key) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Arc::clone(bars));
        }
        self.misses.fetch_add(1, Ordering::Relaxed);

        // Read without holding the lock: a lookup of a cached series need not
        // wait for another file to be parsed. Two concurrent misses of one key
        // both parse it, and the second insert replaces an equal value.
        let bars: Arc<[Bar]> = self.load(&key)?.into();
        self.lock_cache().insert(key.clone(), Arc::clone(&bars));
        tracing::debug!(
            symbol = %key.symbol,
            interval = %key.interval,
            bars = bars.len(),
            "series cached"
        );
        Ok(bars)
    }

    /// Every symbol in the directory with its intervals, both sorted as text.
    /// Files that do not follow `<SYMBOL>_<INTERVAL>.csv` are ignored.
    ///
    /// # Errors
    ///
    /// [`KlineError::Io`] when the directory cannot be listed.
    pub fn catalog(&self) -> Result<BTreeMap<String, Vec<String>>, KlineError> {
        let io_error = |source| KlineError::Io {
            path: self.dir.clone(),
            source,
        };
        let mut catalog: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io_error)? {
            let name = entry.map_err(io_error)?.file_name();
            let Some(key) = name.to_str().and_then(SeriesKey::from_file_name) else {
                continue;
            };
            catalog.entry(key.symbol).or_default().push(key.interval);
        }
        catalog.values_mut().for_each(|intervals| intervals.sort());
        Ok(catalog)
    }

    /// What the cache holds now, and the lookup counters.
    pub fn cache_status(&self) -> CacheStatus {
        let cache = self.lock_cache();
        CacheStatus {
            entries: cache.len(),
            bars: cache.values().map(|bars| bars.len()).sum(),
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }

    /// Drop every cached series and return how many there were. The hit and
    /// miss counters are kept: they count lookups over the store's life.
    /// Series already handed out stay valid for their holders.
    pub fn clear_cache(&self) -> usize {
        let mut cache = self.lock_cache();
        let entries = cache.len();
        cache.clear();
        entries
    }

    fn load(&self, key: &SeriesKey) -> Result<Vec<Bar>, KlineError> {
        let path = self.dir.join(key.file_name());
        match std::fs::read_to_string(&path) {
            Ok(text) => parse_csv(&text, &path),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Err(self.not_found(key)),
            Err(source) => Err(KlineError::Io { path, source }),
        }
    }

    fn not_found(&self, key: &SeriesKey) -> KlineError {
        match self.catalog() {
            Ok(available) => KlineError::NotFound {
                symbol: key.symbol.clone(),
                interval: key.interval.clone(),
                file: key.file_name(),
                available,
            },
            // A missing directory explains the missing file better.
            Err(err) => err,
        }
    }

    fn lock_cache(&self) -> MutexGuard<'_, HashMap<SeriesKey, Arc<[Bar]>>> {
        // No code panics while holding the lock, and every update is a single
        // map operation, so a poisoned map is still consistent.
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Parse the text of one kline file; `path` is only used in errors.
///
/// # Errors
///
/// [`KlineError::Parse`] naming `path` and the 1-based line number of the
/// first line that is not a valid header or bar (see the module docs).
pub fn parse_csv(text: &str, path: &Path) -> Result<Vec<Bar>, KlineError> {
    let parse_error = |line: usize, reason: String| KlineError::Parse {
        path: path.to_path_buf(),
        line,
        reason,
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(index, line)| (index + 1, line));

    let (_, header) = lines
        .next()
        .ok_or_else(|| parse_error(1, "file is empty".into()))?;
    check_header(header).map_err(|reason| parse_error(1, reason))?;

    let mut bars: Vec<Bar> = Vec::new();
    for (number, line) in lines.filter(|(_, line)| !line.trim().is_empty()) {
        let bar = parse_bar(line).map_err(|reason| parse_error(number, reason))?;
        if let Some(previous) = bars.last().filter(|previous| previous.time >= bar.time) {
            let reason = format!("time {:?} is not after {:?}", bar.time, previous.time);
            return Err(parse_error(number, reason));
        }
        bars.push(bar);
    }
    Ok(bars)
}

fn check_header(line: &str) -> Result<(), String> {
    let columns: Vec<&str> = line.split(',').map(str::trim).collect();
    let matches = columns.len() == 1 + VALUE_COLUMNS.len()
        && columns[1..]
            .iter()
            .zip(VALUE_COLUMNS)
            .all(|(got, want)| got.eq_ignore_ascii_case(want));
    if matches {
        Ok(())
    } else {
        Err(format!(
            "header must be \",Open,High,Low,Close,Volume\", got {line:?}"
        ))
    }
}

fn parse_bar(line: &str) -> Result<Bar, String> {
    let fields: Vec<&str> = line.split(',').map(str::trim).collect();
    let [time, open, high, low, close, volume] = fields[..] else {
        return Err(format!("expected 6 fields, got {}", fields.len()));
    };
    if time.is_empty() {
        return Err("the time field is empty".to_string());
    }
    Ok(Bar {
        time: time.to_string(),
        open: price("Open", open)?,
        high: price("High", high)?,
        low: price("Low", low)?,
        close: price("Close", close)?,
        volume: number("Volume", volume).and_then(|v| non_negative("Volume", v))?,
    })
}

fn number(column: &str, text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if value.is_finite() => Ok(value),
        _ => Err(format!("{column} {text:?} is not a finite number")),
    }
}

fn price(column: &str, text: &str) -> Result<f64, String> {
    let value = number(column, text)?;
    if value > 0.0 {
        Ok(value)
    } else {
        Err(format!("{column} {text:?} must be above zero"))
    }
}

fn non_negative(column: &str, value: f64) -> Result<f64, String> {
    if value >= 0.0 {
        Ok(value)
    } else {
        Err(format!("{column} {value} must not be negative"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = ",Open,High,Low,Close,Volume\n";

    fn parse(body: &str) -> Result<Vec<Bar>, KlineError> {
        parse_csv(&format!("{HEADER}{body}"), Path::new("T_1.csv"))
    }

    fn parse_error_at(body: &str) -> (usize, String) {
        match parse(body) {
            Err(KlineError::Parse { line, reason, .. }) => (line, reason),
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    fn store_with(files: &[(&str, &str)]) -> (tempfile::TempDir, KlineStore) {
        let dir = tempfile::tempdir().unwrap();
        for (name, body) in files {
            std::fs::write(dir.path().join(name), body).unwrap();
        }
        let store = KlineStore::new(dir.path());
        (dir, store)
    }

    #[test]
    fn a_well_formed_file_parses_into_bars_in_file_order() {
        let bars = parse("2024-01-01,1,2,0.5,1.5,10\n2024-01-02,1.5,2.5,1,2,0\n").unwrap();
        assert_eq!(bars.len(), 2);
        assert_eq!(
            bars[0],
            Bar {
                time: "2024-01-01".into(),
                open: 1.0,
                high: 2.0,
                low: 0.5,
                close: 1.5,
                volume: 10.0
            }
        );
        assert_eq!(bars[1].time, "2024-01-02");
    }

    #[test]
    fn crlf_line_ends_a_byte_order_mark_and_blank_lines_are_accepted() {
        let text = "\u{feff},open,HIGH,Low,Close,Volume\r\n2024-01-01,1,1,1,1,1\r\n\r\n";
        let bars = parse_csv(text, Path::new("x.csv")).unwrap();
        assert_eq!(bars.len(), 1);
        assert_eq!(bars[0].volume, 1.0);
    }

    #[test]
    fn a_bad_number_names_the_file_the_line_and_the_column() {
        let err = parse("2024-01-01,1,1,1,1,1\n2024-01-02,1,x,1,1,1\n").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("T_1.csv:3: "), "{text}");
        assert!(text.contains("High \"x\""), "{text}");
        assert_eq!(err.code(), code::HANDLER_FAILED);
    }

    #[test]
    fn each_kind_of_bad_line_is_reported_with_its_line_number() {
        assert_eq!(parse_error_at("2024-01-01,1,1,1,1\n").0, 2);
        assert!(parse_error_at("2024-01-01,1,1,1,1\n")
            .1
            .contains("expected 6 fields, got 5"));
        assert!(parse_error_at(",1,1,1,1,1\n")
            .1
            .contains("time field is empty"));
        assert!(parse_error_at("t,1,1,1,0,1\n")
            .1
            .contains("Close \"0\" must be above zero"));
        assert!(parse_error_at("t,1,1,1,1,-2\n")
            .1
            .contains("Volume -2 must not be negative"));
        assert!(parse_error_at("t,1,1,inf,1,1\n")
            .1
            .contains("not a finite number"));
        let (line, reason) = parse_error_at("b,1,1,1,1,1\n\na,1,1,1,1,1\n");
        assert_eq!(line, 4);
        assert!(reason.contains("\"a\" is not after \"b\""), "{reason}");
    }

    #[test]
    fn a_wrong_header_or_an_empty_file_is_an_error_on_line_one() {
        let err = parse_csv("time,open,high\n", Path::new("x.csv")).unwrap_err();
        assert!(
            err.to_string().starts_with("x.csv:1: header must be"),
            "{err}"
        );
        let err = parse_csv("", Path::new("x.csv")).unwrap_err();
        assert_eq!(err.to_string(), "x.csv:1: file is empty");
    }

    #[test]
    fn file_names_upper_case_the_symbol_and_keep_the_interval() {
        assert_eq!(file_name("eurusd", "60").unwrap(), "EURUSD_60.csv");
        assert_eq!(file_name("BTCUSD", "M").unwrap(), "BTCUSD_M.csv");
        for (symbol, interval) in [("../etc", "60"), ("EUR_USD", "60"), ("", "60"), ("A", "")] {
            let err = file_name(symbol, interval).unwrap_err();
            assert_eq!(err.code(), code::BAD_REQUEST, "{symbol:?} {interval:?}");
        }
    }

    #[test]
    fn the_fixtures_hold_eurusd_hourly_and_btcusd_monthly() {
        let store = KlineStore::fixtures();
        let catalog = store.catalog().unwrap();
        assert_eq!(catalog.get("EURUSD"), Some(&vec!["60".to_string()]));
        assert_eq!(catalog.get("BTCUSD"), Some(&vec!["M".to_string()]));
        let eurusd = store.series("eurusd", "60").unwrap();
        assert_eq!(eurusd.len(), 5000);
        assert_eq!(eurusd[0].time, "2017-04-19 09:00:00");
        assert_eq!(eurusd[4999].close, 1.22904);
        assert_eq!(store.series("BTCUSD", "M").unwrap().len(), 156);
    }

    #[test]
    fn a_second_lookup_is_a_cache_hit_and_clearing_empties_the_cache() {
        let body = format!("{HEADER}a,1,1,1,1,1\nb,2,2,2,2,2\n");
        let (_dir, store) = store_with(&[("AAA_5.csv", &body)]);
        store.series("AAA", "5").unwrap();
        store.series("aaa", "5").unwrap();
        let status = store.cache_status();
        assert_eq!(
            status,
            CacheStatus {
                entries: 1,
                bars: 2,
                hits: 1,
                misses: 1
            }
        );

        assert_eq!(store.clear_cache(), 1);
        let status = store.cache_status();
        assert_eq!(
            (status.entries, status.bars, status.hits, status.misses),
            (0, 0, 1, 1)
        );
        store.series("AAA", "5").unwrap();
        assert_eq!(store.cache_status().misses, 2);
    }

    #[test]
    fn a_missing_series_is_not_found_and_lists_what_exists() {
        let (_dir, store) = store_with(&[
            ("AAA_5.csv", HEADER),
            ("AAA_D.csv", HEADER),
            ("BBB_60.csv", HEADER),
            ("notes.txt", "x"),
            ("lower_5.csv", HEADER),
        ]);
        let err = store.series("ccc", "5").unwrap_err();
        assert_eq!(err.code(), code::NOT_FOUND);
        assert_eq!(
            err.to_string(),
            "no klines for symbol CCC interval \"5\" (looked for CCC_5.csv); \
             available: AAA [5, D], BBB [60]"
        );
        assert_eq!(
            store.series("AAA", "d").unwrap_err().code(),
            code::NOT_FOUND
        );
    }

    #[test]
    fn a_missing_directory_is_an_io_error_naming_it() {
        let store = KlineStore::new("/nonexistent/klines-dir");
        let err = store.series("AAA", "5").unwrap_err();
        assert!(matches!(err, KlineError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("/nonexistent/klines-dir"), "{err}");
    }

    #[test]
    fn a_file_that_fails_to_parse_is_not_cached() {
        let (_dir, store) = store_with(&[("BAD_1.csv", ",Open\n")]);
        assert!(matches!(
            store.series("BAD", "1"),
            Err(KlineError::Parse { line: 1, .. })
        ));
        assert_eq!(store.cache_status().entries, 0);
    }
}
