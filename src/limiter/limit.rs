//! What one limit counts: how many hits over which window. A window is a
//! number of units aligned to the Unix epoch (`unit: minute,
//! unit_multiplier: 5`), or a calendar day, week or month in a time zone
//! (`calendar: month, time_zone: Europe/Berlin`), which starts at local
//! midnight and lasts as long as the calendar says: a day is 23 or 25 hours
//! across a daylight-saving change, a month 28 to 31 days.

use std::fmt;
use std::sync::Arc;

use chrono::offset::LocalResult;
use chrono::{DateTime, Datelike, Days, Months, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;

use super::{Algorithm, Unit};

/// The longest epoch-aligned window, a year: every period then stays far
/// below 2^53 µs, where the Redis scripts' doubles are exact.
pub const MAX_WINDOW_SECONDS: u64 = 365 * 86_400;

/// One limit of a rule. A rule has one (`rate_limit`) or several
/// (`rate_limits`), and a hit is admitted only when all of them admit it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limit {
    pub requests_per_unit: u32,
    pub window: Window,
    /// `None`: the server's default algorithm.
    pub algorithm: Option<Algorithm>,
    /// GCRA bucket size; `None`: `requests_per_unit`.
    pub burst: Option<u32>,
    /// Reported as `current_limit.name`, and what `replaces` names.
    pub name: Option<Arc<str>>,
}

/// The span a limit counts over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Window {
    /// `multiplier` × `unit`, aligned to the Unix epoch as
    /// envoyproxy/ratelimit aligns its one-unit windows.
    Units { unit: Unit, multiplier: u32 },
    /// A calendar day, week or month in a time zone; counted as a fixed
    /// window (it never slides, and has no steady rate for GCRA).
    Calendar(Calendar),
}

impl Window {
    /// One `unit`: the window of envoyproxy/ratelimit's rules.
    pub const fn of(unit: Unit) -> Window {
        Window::Units {
            unit,
            multiplier: 1,
        }
    }

    /// The length in seconds; for a calendar window the nominal length of
    /// its unit as Envoy counts units (a month is 30 days).
    pub fn seconds(self) -> u64 {
        match self {
            Window::Units { unit, multiplier } => unit.seconds() * u64::from(multiplier),
            Window::Calendar(c) => c.unit.nominal().seconds(),
        }
    }

    /// The `RateLimitResponse.RateLimit.Unit` to report: for a window of
    /// units, the one exactly as long as the window (`second` × 60 is a
    /// minute), or `None` when no unit is (5 minutes): Envoy derives the
    /// `w=` of its `x-ratelimit-limit` header from the unit, so reporting
    /// any unit there would state a wrong window. A calendar window reports
    /// its unit: "per month" is what it means.
    pub fn reported_unit(self) -> Option<Unit> {
        match self {
            Window::Units {
                unit,
                multiplier: 1,
            } => Some(unit),
            Window::Units { .. } => {
                let seconds = self.seconds();
                Unit::ALL.into_iter().find(|u| u.seconds() == seconds)
            }
            Window::Calendar(c) => Some(c.unit.nominal()),
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Window::Units {
                unit,
                multiplier: 1,
            } => write!(f, "{unit}"),
            Window::Units { unit, multiplier } => write!(f, "{multiplier} {unit}s"),
            Window::Calendar(c) => write!(f, "calendar {} in {}", c.unit, c.time_zone.name()),
        }
    }
}

/// The calendar units a window can follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CalendarUnit {
    /// From local midnight to the next.
    Day,
    /// From Monday's local midnight (ISO 8601 weeks) to the next Monday's.
    Week,
    /// From local midnight on the 1st to the next 1st's.
    Month,
}

impl CalendarUnit {
    pub const ALL: [CalendarUnit; 3] = [CalendarUnit::Day, CalendarUnit::Week, CalendarUnit::Month];

    pub fn as_str(self) -> &'static str {
        match self {
            CalendarUnit::Day => "day",
            CalendarUnit::Week => "week",
            CalendarUnit::Month => "month",
        }
    }

    /// Parses a calendar unit name case-insensitively.
    pub fn parse(s: &str) -> Option<CalendarUnit> {
        CalendarUnit::ALL
            .into_iter()
            .find(|u| u.as_str().eq_ignore_ascii_case(s))
    }

    /// The unit of the same name.
    pub fn nominal(self) -> Unit {
        match self {
            CalendarUnit::Day => Unit::Day,
            CalendarUnit::Week => Unit::Week,
            CalendarUnit::Month => Unit::Month,
        }
    }
}

impl fmt::Display for CalendarUnit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A calendar window: `unit` in `time_zone`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Calendar {
    pub unit: CalendarUnit,
    pub time_zone: Tz,
}

/// Calendar windows found lately on this thread, with the bounds around
/// them: a tenant's monthly quota asks for its month on every metered
/// decision, and finding it in a time zone costs 40-90 ns (`window_at`) or
/// 115-280 ns (`bounds_around`) where a lookup here costs about 4
/// (`benches/core.rs`, group `calendar_month`). Eight hold the tenants'
/// time zones a thread meets at once in all but unusual deployments; past
/// that, entries take turns and a miss costs what no cache would. Entries
/// never go stale: a window's bounds do not change, and one is used only
/// for the instants inside it.
const RECENT_WINDOWS: usize = 8;

/// A calendar and the bounds around one of its windows
/// ([`Calendar::bounds_around`]).
type Bounds = (Calendar, [u64; 4]);

thread_local! {
    /// The windows, and where the next one goes (round robin).
    static RECENT: std::cell::RefCell<([Option<Bounds>; RECENT_WINDOWS], usize)> =
        const { std::cell::RefCell::new(([None; RECENT_WINDOWS], 0)) };
}

impl Calendar {
    /// The window that holds `now_us`: its start and end (µs since the
    /// epoch), the start included.
    ///
    /// Never inlined: `check` calls it for calendar counters only, and
    /// inlined there (with the thread-local cache) it slowed every other
    /// counter's check (`benches/core.rs`, BENCHMARKS.md).
    #[inline(never)]
    pub fn window_at(self, now_us: u64) -> (u64, u64) {
        let [_, start, end, _] = self.bounds_around(now_us);
        (start, end)
    }

    fn find_window(self, now_us: u64) -> (u64, u64) {
        let now = DateTime::from_timestamp_micros(i64::try_from(now_us).unwrap_or(i64::MAX))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        let today = now.with_timezone(&self.time_zone).date_naive();
        let (first, next) = match self.unit {
            CalendarUnit::Day => (today, today + Days::new(1)),
            CalendarUnit::Week => {
                let monday = today - Days::new(u64::from(today.weekday().num_days_from_monday()));
                (monday, monday + Days::new(7))
            }
            CalendarUnit::Month => {
                let first = today.with_day(1).unwrap_or(today);
                (first, first + Months::new(1))
            }
        };
        (self.midnight(first), self.midnight(next))
    }

    /// The boundaries of three windows around `now_us`: the previous
    /// window's start, this one's start and end, and the next one's end.
    /// The Redis script picks among these three windows by Redis' own clock,
    /// so instances whose clocks disagree (by less than a window) still
    /// count in the same window.
    pub fn bounds_around(self, now_us: u64) -> [u64; 4] {
        let hit = |(calendar, bounds): &Bounds| {
            *calendar == self && (bounds[1]..bounds[2]).contains(&now_us)
        };
        let cached =
            RECENT.with_borrow(|(recent, _)| recent.iter().flatten().find(|e| hit(e)).map(|e| e.1));
        if let Some(bounds) = cached {
            return bounds;
        }
        let (start, end) = self.find_window(now_us);
        let (previous, _) = self.find_window(start.saturating_sub(1));
        let (_, next_end) = self.find_window(end);
        let bounds = [previous, start, end, next_end];
        RECENT.with_borrow_mut(|(recent, next)| {
            recent[*next] = Some((self, bounds));
            *next = (*next + 1) % RECENT_WINDOWS;
        });
        bounds
    }

    /// When `date` starts in the time zone, in µs since the epoch.
    fn midnight(self, date: NaiveDate) -> u64 {
        let local = date.and_time(chrono::NaiveTime::MIN);
        let start = match self.time_zone.from_local_datetime(&local) {
            LocalResult::Single(t) => t.with_timezone(&Utc),
            // Clocks went back over midnight: the day starts at the first.
            LocalResult::Ambiguous(first, _) => first.with_timezone(&Utc),
            // Clocks jumped forward over midnight (some zones change at
            // 00:00): the day starts at the jump, the first instant whose
            // local time is past midnight. Offsets lie within ±26 hours, so
            // the jump is within a day of midnight read as UTC; found by
            // bisection on whole seconds (tz changes fall on whole seconds).
            LocalResult::None => {
                let guess = local.and_utc().timestamp();
                let (mut before, mut after) = (guess - 26 * 3_600, guess + 26 * 3_600);
                while after - before > 1 {
                    let mid = before + (after - before) / 2;
                    let local_mid = DateTime::from_timestamp(mid, 0)
                        .map(|t| t.with_timezone(&self.time_zone).naive_local());
                    if local_mid.is_some_and(|t| t >= local) {
                        after = mid;
                    } else {
                        before = mid;
                    }
                }
                DateTime::from_timestamp(after, 0).unwrap_or(DateTime::<Utc>::MAX_UTC)
            }
        };
        u64::try_from(start.timestamp_micros()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000;
    const HOUR: u64 = 3_600 * S;

    fn calendar(unit: CalendarUnit, zone: &str) -> Calendar {
        Calendar {
            unit,
            time_zone: zone.parse().unwrap(),
        }
    }

    /// µs of a UTC date and time.
    fn utc(y: i32, m: u32, d: u32, h: u32, min: u32) -> u64 {
        Utc.with_ymd_and_hms(y, m, d, h, min, 0)
            .unwrap()
            .timestamp_micros() as u64
    }

    #[test]
    fn a_month_in_berlin_starts_at_local_midnight_on_the_first() {
        let month = calendar(CalendarUnit::Month, "Europe/Berlin");
        // 15 Jan 2027, noon: January in Berlin (UTC+1) is 31 Dec 23:00 UTC
        // to 31 Jan 23:00 UTC.
        assert_eq!(
            month.window_at(utc(2027, 1, 15, 12, 0)),
            (utc(2026, 12, 31, 23, 0), utc(2027, 1, 31, 23, 0))
        );
        // 31 Jan 23:30 UTC is already February in Berlin.
        assert_eq!(
            month.window_at(utc(2027, 1, 31, 23, 30)).0,
            utc(2027, 1, 31, 23, 0)
        );
        // March starts in winter time and ends in summer time (UTC+2).
        assert_eq!(
            month.window_at(utc(2027, 3, 10, 0, 0)),
            (utc(2027, 2, 28, 23, 0), utc(2027, 3, 31, 22, 0))
        );
    }

    #[test]
    fn a_day_across_a_daylight_saving_change_is_23_or_25_hours() {
        let day = calendar(CalendarUnit::Day, "Europe/Berlin");
        // Clocks went forward on 28 Mar 2027 and back on 31 Oct 2027.
        let (start, end) = day.window_at(utc(2027, 3, 28, 12, 0));
        assert_eq!((start, end - start), (utc(2027, 3, 27, 23, 0), 23 * HOUR));
        let (start, end) = day.window_at(utc(2027, 10, 31, 12, 0));
        assert_eq!((start, end - start), (utc(2027, 10, 30, 22, 0), 25 * HOUR));
    }

    #[test]
    fn a_week_starts_on_monday() {
        let week = calendar(CalendarUnit::Week, "UTC");
        // Thursday 7 Jan 2027: the week of Monday 4 Jan.
        assert_eq!(
            week.window_at(utc(2027, 1, 7, 5, 0)),
            (utc(2027, 1, 4, 0, 0), utc(2027, 1, 11, 0, 0))
        );
        assert_eq!(
            week.window_at(utc(2027, 1, 4, 0, 0)).0,
            utc(2027, 1, 4, 0, 0)
        );
    }

    #[test]
    fn a_midnight_clocks_skip_starts_the_day_at_the_jump() {
        // Santiago moved its clocks from 00:00 to 01:00 on 8 Sep 2024: that
        // day started at 01:00 local, 04:00 UTC.
        let day = calendar(CalendarUnit::Day, "America/Santiago");
        let (start, end) = day.window_at(utc(2024, 9, 8, 12, 0));
        assert_eq!(start, utc(2024, 9, 8, 4, 0));
        assert_eq!(end - start, 23 * HOUR);
        // Samoa skipped 30 Dec 2011 whole: the 29th ran into the 31st.
        let day = calendar(CalendarUnit::Day, "Pacific/Apia");
        let (start, end) = day.window_at(utc(2011, 12, 30, 9, 0));
        assert_eq!(end - start, 24 * HOUR);
        assert_eq!(day.window_at(end).0, end);
    }

    #[test]
    fn bounds_around_name_three_consecutive_windows() {
        let month = calendar(CalendarUnit::Month, "Europe/Berlin");
        let now = utc(2027, 2, 10, 0, 0);
        assert_eq!(
            month.bounds_around(now),
            [
                utc(2026, 12, 31, 23, 0),
                utc(2027, 1, 31, 23, 0),
                utc(2027, 2, 28, 23, 0),
                utc(2027, 3, 31, 22, 0)
            ]
        );
    }

    #[test]
    fn every_instant_lies_in_the_window_it_is_given() {
        for zone in [
            "UTC",
            "Europe/Berlin",
            "America/Santiago",
            "Asia/Kathmandu",
            "Pacific/Apia",
        ] {
            for unit in CalendarUnit::ALL {
                let c = calendar(unit, zone);
                let mut now = utc(2024, 1, 1, 0, 0);
                while now < utc(2025, 1, 1, 0, 0) {
                    let (start, end) = c.window_at(now);
                    assert!(
                        start <= now && now < end,
                        "{zone} {unit}: {now} not in [{start}, {end})"
                    );
                    assert_eq!(
                        c.window_at(end).0,
                        end,
                        "{zone} {unit}: windows are contiguous"
                    );
                    now += 7 * HOUR + 13 * 60 * S;
                }
            }
        }
    }

    #[test]
    fn the_reported_unit_is_exact_or_none() {
        let units = |unit, multiplier| Window::Units { unit, multiplier };
        assert_eq!(units(Unit::Minute, 1).reported_unit(), Some(Unit::Minute));
        assert_eq!(units(Unit::Second, 60).reported_unit(), Some(Unit::Minute));
        assert_eq!(units(Unit::Day, 30).reported_unit(), Some(Unit::Month));
        assert_eq!(units(Unit::Minute, 5).reported_unit(), None);
        assert_eq!(units(Unit::Minute, 5).seconds(), 300);
        let month = Window::Calendar(calendar(CalendarUnit::Month, "UTC"));
        assert_eq!(month.reported_unit(), Some(Unit::Month));
        assert_eq!(month.to_string(), "calendar month in UTC");
        assert_eq!(units(Unit::Minute, 5).to_string(), "5 minutes");
    }
}
