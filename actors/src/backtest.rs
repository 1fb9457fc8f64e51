//! A moving-average crossover backtest over bars: pure computation, no actors.
//!
//! # The strategy
//!
//! - Two simple moving averages of the close: `fast` and `slow` bars long
//!   (defaults 10 and 30, `1 <= fast < slow`). Bar `i` is an *up cross* when
//!   `fast - slow` was `<= 0` at bar `i - 1` and is `> 0` at bar `i`, a *down
//!   cross* when it was `>= 0` and is `< 0`. Both averages must exist at
//!   `i - 1`, so the first possible cross is bar `slow`.
//! - Long only. An up cross while flat buys at that bar's close; a down cross
//!   while long sells at that bar's close. A down cross while flat does
//!   nothing. An up cross on the last bar opens nothing: there is no later
//!   bar to sell at, so the trade could only pay fees.
//! - A position still open at the last bar is sold at its close
//!   ([`ExitReason::EndOfData`]).
//! - A proportional fee (default 0.1%, i.e. `0.001`) is paid on each side: a
//!   buy invests `equity * (1 - fee)`, a sell receives `value * (1 - fee)`. So
//!   a trade's return is `(1 - fee)^2 * exit / entry - 1`.
//! - The whole equity is invested in each trade, so returns compound.
//!
//! # The figures
//!
//! The equity curve has one point per bar: the cash when flat, the position
//! marked at the bar's close when long (after the buy fee), the cash after the
//! sell fee on a bar that sells. `max_drawdown` is the largest fall of that
//! curve from its running peak (which starts at `initial_capital`), as a
//! fraction of the peak, so it lies in `[0, 1)`. `win_rate` is the share of
//! trades whose return after fees is above zero (0 without trades);
//! `net_return` is `final_equity / initial_capital - 1`.
//!
//! The run is deterministic: each average is summed afresh over its window in
//! bar order, so the same bars and parameters always give the same figures
//! (no drift from a running sum). That costs `O(bars * slow)`, which is
//! nothing at the few thousand bars a request covers.

use serde::Serialize;

use crate::klines::Bar;

/// Default fast moving-average length, in bars.
pub const DEFAULT_FAST: usize = 10;
/// Default slow moving-average length, in bars.
pub const DEFAULT_SLOW: usize = 30;
/// Default fee per side, as a fraction of the traded value (0.1%).
pub const DEFAULT_FEE: f64 = 0.001;
/// Default starting equity.
pub const DEFAULT_INITIAL_CAPITAL: f64 = 10_000.0;
/// How many progress steps a run reports: one per quarter of the bars.
const PROGRESS_STEPS: usize = 4;

/// The strategy's parameters. See the module docs for their meaning.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StrategyParams {
    /// Length of the fast moving average, in bars.
    pub fast: usize,
    /// Length of the slow moving average, in bars; more than `fast`.
    pub slow: usize,
    /// Fee per side as a fraction of the traded value (`0.001` = 0.1%).
    pub fee: f64,
    /// Equity at the start.
    pub initial_capital: f64,
}

impl Default for StrategyParams {
    fn default() -> Self {
        Self {
            fast: DEFAULT_FAST,
            slow: DEFAULT_SLOW,
            fee: DEFAULT_FEE,
            initial_capital: DEFAULT_INITIAL_CAPITAL,
        }
    }
}

/// Parameters that cannot be run, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid backtest parameters: {0}")]
pub struct ParamError(String);

impl StrategyParams {
    /// Check the parameters can be run.
    ///
    /// # Errors
    ///
    /// [`ParamError`] unless `1 <= fast < slow`, `0 <= fee < 1` and
    /// `initial_capital` is finite and above zero.
    pub fn validate(&self) -> Result<(), ParamError> {
        if self.fast == 0 || self.fast >= self.slow {
            return Err(ParamError(format!(
                "need 1 <= fast < slow, got fast {} and slow {}",
                self.fast, self.slow
            )));
        }
        if !(0.0..1.0).contains(&self.fee) {
            return Err(ParamError(format!(
                "fee must be in [0, 1), got {}",
                self.fee
            )));
        }
        if !(self.initial_capital.is_finite() && self.initial_capital > 0.0) {
            let capital = self.initial_capital;
            return Err(ParamError(format!(
                "initial_capital must be above zero, got {capital}"
            )));
        }
        Ok(())
    }
}

/// Why a trade was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    /// A down cross.
    Cross,
    /// The position was still open at the last bar.
    EndOfData,
}

/// One round trip: bought at `entry_*`, sold at `exit_*`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Trade {
    /// Time of the bar that bought.
    pub entry_time: String,
    /// The close the position was bought at.
    pub entry_price: f64,
    /// Time of the bar that sold.
    pub exit_time: String,
    /// The close the position was sold at.
    pub exit_price: f64,
    /// The trade's return after both fees; serialised as `return`.
    #[serde(rename = "return")]
    pub net_return: f64,
    /// Why the position was sold.
    pub exit_reason: ExitReason,
}

/// The outcome of a run. See the module docs for how each figure is defined.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BacktestReport {
    /// Bars the run went over.
    pub bars: usize,
    /// Round trips made.
    pub total_trades: usize,
    /// Trades with a return above zero after fees.
    pub wins: usize,
    /// `wins / total_trades`, 0 without trades.
    pub win_rate: f64,
    /// `final_equity / initial_capital - 1`.
    pub net_return: f64,
    /// Largest fall of the equity curve from its peak, as a fraction.
    pub max_drawdown: f64,
    /// Equity at the start.
    pub initial_capital: f64,
    /// Equity at the end, every position sold.
    pub final_equity: f64,
    /// Every trade, oldest first.
    pub trades: Vec<Trade>,
}

/// What a run reports while it goes, in bar order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BacktestStep<'a> {
    /// A position was opened at `bar`'s close.
    Entered {
        /// The bar that bought.
        bar: &'a Bar,
    },
    /// A position was closed.
    Exited {
        /// The finished trade.
        trade: &'a Trade,
    },
    /// Progress through the bars; reported once per quarter.
    Progress {
        /// `bars_done * 100 / bars_total`, rounded down.
        percent: usize,
        /// Bars processed so far.
        bars_done: usize,
        /// Bars in the run.
        bars_total: usize,
    },
}

/// Run the strategy over `bars` (oldest first).
///
/// # Errors
///
/// [`ParamError`] when `params` fail [`StrategyParams::validate`].
pub fn run(bars: &[Bar], params: &StrategyParams) -> Result<BacktestReport, ParamError> {
    run_observed(bars, params, &mut |_| {})
}

/// Run the strategy over `bars` (oldest first), telling `observer` of each
/// entry, exit and quarter of progress as it happens.
///
/// # Errors
///
/// [`ParamError`] when `params` fail [`StrategyParams::validate`]; the
/// observer is then never called.
pub fn run_observed(
    bars: &[Bar],
    params: &StrategyParams,
    observer: &mut dyn FnMut(BacktestStep<'_>),
) -> Result<BacktestReport, ParamError> {
    params.validate()?;
    let closes: Vec<f64> = bars.iter().map(|bar| bar.close).collect();
    let mut account = Account::new(params);
    let mut progress = ProgressMarks::new(bars.len());

    for (index, bar) in bars.iter().enumerate() {
        let is_last = index + 1 == bars.len();
        let signal = cross_at(&closes, index, params);
        if account.is_flat() {
            if signal == Some(Cross::Up) && !is_last {
                account.buy(bar);
                observer(BacktestStep::Entered { bar });
            }
        } else if let Some(reason) = exit_reason(signal, is_last) {
            if let Some(trade) = account.sell(bar, reason) {
                observer(BacktestStep::Exited { trade });
            }
        }
        account.mark(bar.close);
        if let Some(step) = progress.after(index) {
            observer(step);
        }
    }
    Ok(account.into_report(bars.len()))
}

/// Why a long position closes at this bar, if it does.
fn exit_reason(signal: Option<Cross>, is_last: bool) -> Option<ExitReason> {
    match signal {
        Some(Cross::Down) => Some(ExitReason::Cross),
        _ if is_last => Some(ExitReason::EndOfData),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cross {
    Up,
    Down,
}

fn cross_at(closes: &[f64], index: usize, params: &StrategyParams) -> Option<Cross> {
    if index < params.slow {
        return None;
    }
    let spread = |end: usize| mean(closes, end, params.fast) - mean(closes, end, params.slow);
    let (before, now) = (spread(index - 1), spread(index));
    if before <= 0.0 && now > 0.0 {
        Some(Cross::Up)
    } else if before >= 0.0 && now < 0.0 {
        Some(Cross::Down)
    } else {
        None
    }
}

/// The mean of the `window` closes ending at `end` (inclusive).
fn mean(closes: &[f64], end: usize, window: usize) -> f64 {
    closes[end + 1 - window..=end].iter().sum::<f64>() / window as f64
}

/// An open long position.
#[derive(Debug)]
struct Position {
    entry_time: String,
    entry_price: f64,
    /// The equity before the buy, to compute the trade's return from.
    equity_before: f64,
    /// What the buy invested, after its fee.
    invested: f64,
}

/// Cash, the open position and the equity curve's running figures.
#[derive(Debug)]
struct Account {
    fee: f64,
    initial_capital: f64,
    cash: f64,
    position: Option<Position>,
    peak: f64,
    max_drawdown: f64,
    trades: Vec<Trade>,
}

impl Account {
    fn new(params: &StrategyParams) -> Self {
        Self {
            fee: params.fee,
            initial_capital: params.initial_capital,
            cash: params.initial_capital,
            position: None,
            peak: params.initial_capital,
            max_drawdown: 0.0,
            trades: Vec::new(),
        }
    }

    fn is_flat(&self) -> bool {
        self.position.is_none()
    }

    fn buy(&mut self, bar: &Bar) {
        self.position = Some(Position {
            entry_time: bar.time.clone(),
            entry_price: bar.close,
            equity_before: self.cash,
            invested: self.cash * (1.0 - self.fee),
        });
        self.cash = 0.0;
    }

    /// Close the open position at `bar`'s close; `None` when flat.
    fn sell(&mut self, bar: &Bar, reason: ExitReason) -> Option<&Trade> {
        let position = self.position.take()?;
        let proceeds = position.invested * bar.close / position.entry_price * (1.0 - self.fee);
        self.cash = proceeds;
        self.trades.push(Trade {
            entry_time: position.entry_time,
            entry_price: position.entry_price,
            exit_time: bar.time.clone(),
            exit_price: bar.close,
            net_return: proceeds / position.equity_before - 1.0,
            exit_reason: reason,
        });
        self.trades.last()
    }

    /// Add the equity at `close` to the curve.
    fn mark(&mut self, close: f64) {
        let equity = match &self.position {
            Some(position) => position.invested * close / position.entry_price,
            None => self.cash,
        };
        self.peak = self.peak.max(equity);
        self.max_drawdown = self.max_drawdown.max((self.peak - equity) / self.peak);
    }

    fn into_report(self, bars: usize) -> BacktestReport {
        let wins = self
            .trades
            .iter()
            .filter(|trade| trade.net_return > 0.0)
            .count();
        let total_trades = self.trades.len();
        BacktestReport {
            bars,
            total_trades,
            wins,
            win_rate: if total_trades == 0 {
                0.0
            } else {
                wins as f64 / total_trades as f64
            },
            net_return: self.cash / self.initial_capital - 1.0,
            max_drawdown: self.max_drawdown,
            initial_capital: self.initial_capital,
            final_equity: self.cash,
            trades: self.trades,
        }
    }
}

/// Decides after which bars a progress step is due: the first bar at or past
/// each quarter, at most [`PROGRESS_STEPS`] in all.
#[derive(Debug)]
struct ProgressMarks {
    total: usize,
    next_percent: usize,
}

impl ProgressMarks {
    fn new(total: usize) -> Self {
        Self {
            total,
            next_percent: 100 / PROGRESS_STEPS,
        }
    }

    fn after(&mut self, index: usize) -> Option<BacktestStep<'static>> {
        let bars_done = index + 1;
        let percent = bars_done * 100 / self.total;
        if percent < self.next_percent {
            return None;
        }
        let step = 100 / PROGRESS_STEPS;
        // Skip every mark this bar passed, so a short series reports once per bar.
        self.next_percent = (percent / step + 1) * step;
        Some(BacktestStep::Progress {
            percent,
            bars_done,
            bars_total: self.total,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::klines::KlineStore;

    const TOLERANCE: f64 = 1e-12;

    fn bars(closes: &[f64]) -> Vec<Bar> {
        closes
            .iter()
            .enumerate()
            .map(|(index, &close)| Bar {
                time: format!("t{index:02}"),
                open: close,
                high: close,
                low: close,
                close,
                volume: 1.0,
            })
            .collect()
    }

    fn params(fast: usize, slow: usize, fee: f64, initial_capital: f64) -> StrategyParams {
        StrategyParams {
            fast,
            slow,
            fee,
            initial_capital,
        }
    }

    fn assert_close(actual: f64, expected: f64, what: &str) {
        assert!(
            (actual - expected).abs() < TOLERANCE,
            "{what}: {actual} != {expected}"
        );
    }

    #[test]
    fn a_losing_trade_without_fees_exits_on_the_down_cross_after_a_tie() {
        // fast=2, slow=3. fast-slow by bar from bar 2: -0.5, -1/6, +2/3, +5/6,
        // 0, -1, -5/6. Up cross at bar 4 (close 11). Bar 6 is a tie, not a
        // cross; bar 7 crosses down from the tie (close 8).
        let series = bars(&[10.0, 9.0, 8.0, 9.0, 11.0, 12.0, 10.0, 8.0, 7.0]);
        let report = run(&series, &params(2, 3, 0.0, 100.0)).unwrap();

        assert_eq!(report.total_trades, 1);
        let trade = &report.trades[0];
        assert_eq!(
            (trade.entry_time.as_str(), trade.entry_price),
            ("t04", 11.0)
        );
        assert_eq!((trade.exit_time.as_str(), trade.exit_price), ("t07", 8.0));
        assert_eq!(trade.exit_reason, ExitReason::Cross);
        assert_close(trade.net_return, 8.0 / 11.0 - 1.0, "trade return");
        assert_eq!((report.wins, report.win_rate), (0, 0.0));
        assert_close(report.net_return, -3.0 / 11.0, "net return");
        assert_close(report.final_equity, 100.0 * 8.0 / 11.0, "final equity");
        // Peak 100*12/11 at bar 5, trough 100*8/11 from bar 7.
        assert_close(report.max_drawdown, 1.0 - 8.0 / 12.0, "max drawdown");
    }

    #[test]
    fn fees_compound_over_two_trades_and_the_last_closes_at_the_end() {
        // fast=2, slow=3: up at bar 4 (6), down at bar 7 (5), up at bar 10 (7);
        // still long at bar 11, sold at its close (9).
        let series = bars(&[5.0, 4.0, 3.0, 4.0, 6.0, 8.0, 7.0, 5.0, 4.0, 5.0, 7.0, 9.0]);
        let report = run(&series, &params(2, 3, 0.01, 1000.0)).unwrap();

        let kept = 0.99 * 0.99;
        let first = kept * 5.0 / 6.0 - 1.0;
        let second = kept * 9.0 / 7.0 - 1.0;
        assert_eq!(report.total_trades, 2);
        assert_close(report.trades[0].net_return, first, "first trade");
        assert_close(report.trades[1].net_return, second, "second trade");
        assert_eq!(report.trades[1].entry_time, "t10");
        assert_eq!(report.trades[1].exit_time, "t11");
        assert_eq!(report.trades[1].exit_reason, ExitReason::EndOfData);
        assert_eq!((report.wins, report.win_rate), (1, 0.5));
        assert_close(
            report.net_return,
            (1.0 + first) * (1.0 + second) - 1.0,
            "net return",
        );
        assert_close(
            report.final_equity,
            1000.0 * (1.0 + first) * (1.0 + second),
            "equity",
        );
        // Peak: 1000*0.99*8/6 at bar 5. Trough: just after the second buy,
        // 1000*0.99^3*5/6. Their ratio is 0.99^2*5/8.
        assert_close(report.max_drawdown, 1.0 - kept * 5.0 / 8.0, "max drawdown");
    }

    #[test]
    fn a_rise_from_a_tie_is_an_up_cross_and_a_last_bar_down_cross_is_a_cross_exit() {
        // fast=1, slow=2: spread is half the bar-to-bar change: -0.5, 0 (a
        // tie), +1 (up cross from the tie, buy at 4), -1.5 (down cross on
        // the last bar, sell at 1).
        let report = run(&bars(&[3.0, 2.0, 2.0, 4.0, 1.0]), &params(1, 2, 0.0, 8.0)).unwrap();
        assert_eq!(report.total_trades, 1);
        let trade = &report.trades[0];
        assert_eq!((trade.entry_time.as_str(), trade.entry_price), ("t03", 4.0));
        assert_eq!(
            (trade.exit_time.as_str(), trade.exit_reason),
            ("t04", ExitReason::Cross)
        );
        assert_close(trade.net_return, 1.0 / 4.0 - 1.0, "trade return");
        assert_close(report.final_equity, 2.0, "final equity");
        assert_close(report.max_drawdown, 0.75, "max drawdown");
    }

    #[test]
    fn an_up_cross_on_the_last_bar_opens_no_position() {
        // fast=1, slow=2: close minus the 2-bar mean is -0.5, -0.5, +2.
        let report = run(&bars(&[3.0, 2.0, 1.0, 5.0]), &params(1, 2, 0.001, 50.0)).unwrap();
        assert_eq!(report.total_trades, 0);
        assert_eq!(
            (report.net_return, report.max_drawdown, report.final_equity),
            (0.0, 0.0, 50.0)
        );
    }

    #[test]
    fn a_down_cross_while_flat_opens_no_short() {
        // fast=1, slow=2: spread +0.5, +0.5, -0.5 (down cross at bar 3), -0.5, -0.25.
        let report = run(
            &bars(&[1.0, 2.0, 3.0, 2.0, 1.0, 0.5]),
            &params(1, 2, 0.0, 10.0),
        )
        .unwrap();
        assert_eq!(report.total_trades, 0);
        assert_eq!(report.final_equity, 10.0);
    }

    #[test]
    fn the_entry_fee_alone_is_a_drawdown() {
        // fast=1, slow=2: up cross at bar 2 (close 2), then flat prices and an
        // end-of-data sale at 2: the two fees are the whole loss.
        let report = run(&bars(&[2.0, 1.0, 2.0, 2.0]), &params(1, 2, 0.1, 100.0)).unwrap();
        assert_eq!(report.total_trades, 1);
        assert_close(report.trades[0].net_return, 0.81 - 1.0, "trade return");
        assert_close(report.max_drawdown, 0.19, "max drawdown");
        assert_close(report.final_equity, 81.0, "final equity");
    }

    #[test]
    fn too_few_bars_or_none_give_an_empty_report() {
        let defaults = StrategyParams::default();
        for count in [0, 1, 30] {
            let report = run(&bars(&vec![1.0; count]), &defaults).unwrap();
            assert_eq!((report.bars, report.total_trades), (count, 0));
            assert_eq!(report.final_equity, DEFAULT_INITIAL_CAPITAL);
        }
    }

    #[test]
    fn parameters_that_cannot_run_are_refused() {
        let defaults = StrategyParams::default();
        let bad = [
            StrategyParams {
                fast: 0,
                ..defaults
            },
            StrategyParams {
                fast: 30,
                slow: 30,
                ..defaults
            },
            StrategyParams {
                fee: 1.0,
                ..defaults
            },
            StrategyParams {
                fee: -0.01,
                ..defaults
            },
            StrategyParams {
                fee: f64::NAN,
                ..defaults
            },
            StrategyParams {
                initial_capital: 0.0,
                ..defaults
            },
            StrategyParams {
                initial_capital: f64::INFINITY,
                ..defaults
            },
        ];
        for params in bad {
            assert!(run(&bars(&[1.0; 40]), &params).is_err(), "{params:?}");
        }
        assert!(defaults.validate().is_ok());
    }

    #[test]
    fn progress_is_reported_once_per_quarter_or_per_bar_when_short() {
        let percents = |count: usize| {
            let mut seen = Vec::new();
            run_observed(
                &bars(&vec![1.0; count]),
                &StrategyParams::default(),
                &mut |step| {
                    if let BacktestStep::Progress { percent, .. } = step {
                        seen.push(percent);
                    }
                },
            )
            .unwrap();
            seen
        };
        assert_eq!(percents(8), [25, 50, 75, 100]);
        assert_eq!(percents(3), [33, 66, 100]);
        assert_eq!(percents(1), [100]);
        assert!(percents(0).is_empty());
    }

    #[test]
    fn the_observer_sees_each_entry_before_its_exit() {
        let series = bars(&[5.0, 4.0, 3.0, 4.0, 6.0, 8.0, 7.0, 5.0, 4.0, 5.0, 7.0, 9.0]);
        let mut seen = Vec::new();
        let report = run_observed(&series, &params(2, 3, 0.0, 1.0), &mut |step| match step {
            BacktestStep::Entered { bar } => seen.push(format!("in {}", bar.time)),
            BacktestStep::Exited { trade } => seen.push(format!("out {}", trade.exit_time)),
            BacktestStep::Progress { .. } => {}
        })
        .unwrap();
        assert_eq!(seen, ["in t04", "out t07", "in t10", "out t11"]);
        assert_eq!(report.total_trades, 2);
    }

    #[test]
    fn the_eurusd_fixture_gives_sane_and_repeatable_figures() {
        let series = KlineStore::fixtures().series("EURUSD", "60").unwrap();
        let first = run(&series, &StrategyParams::default()).unwrap();
        let second = run(&series, &StrategyParams::default()).unwrap();
        assert_eq!(first, second);

        assert!(first.total_trades > 0);
        assert!((0.0..=1.0).contains(&first.win_rate));
        assert!((0.0..1.0).contains(&first.max_drawdown));
        assert_close(
            first.net_return,
            first.final_equity / first.initial_capital - 1.0,
            "net",
        );
        for trade in &first.trades {
            assert!(trade.entry_time < trade.exit_time, "{trade:?}");
        }
        for pair in first.trades.windows(2) {
            assert!(pair[0].exit_time < pair[1].entry_time, "{pair:?}");
        }
        let compounded = first
            .trades
            .iter()
            .fold(1.0, |equity, t| equity * (1.0 + t.net_return));
        assert!((compounded - 1.0 - first.net_return).abs() < 1e-9);
    }
}
