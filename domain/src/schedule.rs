//! Schedules of installation objects: `@every <n>m|h|d` or a five-field cron expression
//! (minute hour day-of-month month day-of-week, UTC). A schedule names *slots*: the times a
//! read is due. The scheduler requests one read per slot; a slot is an idempotency key, so
//! two schedulers (or one restarted) never request the same slot twice.

use chrono::{DateTime, Datelike, Duration, TimeZone, Timelike, Utc};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Schedule {
    Every(Duration),
    Cron(Cron),
}

/// One bit per allowed value of each field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    /// Both day fields restricted: a day matches if either does (as cron does).
    day_or: bool,
}

impl Schedule {
    pub fn parse(expr: &str) -> Option<Schedule> {
        if let Some(rest) = expr.strip_prefix("@every ") {
            // The unit is the last character, whatever its width (`@every 5分` is no schedule).
            let (digits, unit) = rest.split_at(rest.char_indices().last().map_or(0, |(at, _)| at));
            let n: i64 = digits.parse().ok().filter(|n| *n >= 1 && *n <= 100_000)?;
            return Some(Schedule::Every(match unit {
                "m" => Duration::minutes(n),
                "h" => Duration::hours(n),
                "d" => Duration::days(n),
                _ => return None,
            }));
        }
        let fields: Vec<&str> = expr.split_whitespace().collect();
        let [minute, hour, day, month, weekday] = fields[..] else { return None };
        let weekdays = field(weekday, 0, 7)?;
        // 7 is Sunday too.
        let weekdays = (weekdays | (weekdays >> 7)) & 0x7f;
        Some(Schedule::Cron(Cron {
            minutes: field(minute, 0, 59)?,
            hours: field(hour, 0, 23)?,
            days: field(day, 1, 31)?,
            months: field(month, 1, 12)?,
            weekdays,
            day_or: !day.starts_with('*') && !weekday.starts_with('*'),
        }))
    }

    /// The latest slot at or before `now` (within the last 366 days for cron).
    pub fn last_slot(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Every(every) => {
                let step = every.num_seconds();
                let t = now.timestamp();
                Utc.timestamp_opt(t - t.rem_euclid(step), 0).single()
            }
            Schedule::Cron(cron) => cron.last_slot(now),
        }
    }
}

impl Cron {
    fn day_matches(&self, date: DateTime<Utc>) -> bool {
        let day = bit(self.days, date.day());
        let weekday = bit(self.weekdays, date.weekday().num_days_from_sunday());
        bit(self.months, date.month()) && if self.day_or { day || weekday } else { day && weekday }
    }

    fn last_slot(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let today = now.date_naive().and_hms_opt(0, 0, 0)?.and_utc();
        for back in 0..=366 {
            let day = today - Duration::days(back);
            if !self.day_matches(day) {
                continue;
            }
            let last_hour = if back == 0 { now.hour() } else { 23 };
            for hour in (0..=last_hour).rev().filter(|h| bit(self.hours, *h)) {
                let last_minute = if back == 0 && hour == now.hour() { now.minute() } else { 59 };
                if let Some(minute) = (0..=last_minute).rev().find(|m| bit(self.minutes, *m)) {
                    return Some(day + Duration::hours(hour.into()) + Duration::minutes(minute.into()));
                }
            }
        }
        None
    }
}

fn bit(set: u64, value: u32) -> bool {
    set & (1 << value) != 0
}

/// `*`, `*/s`, `a`, `a-b`, `a-b/s`, `a/s` and comma lists of them, within `[min, max]`.
fn field(spec: &str, min: u32, max: u32) -> Option<u64> {
    let mut set = 0u64;
    for item in spec.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => (range, step.parse::<u32>().ok().filter(|s| *s >= 1)?),
            None => (item, 1),
        };
        let (from, to) = if range == "*" {
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            (a.parse().ok()?, b.parse().ok()?)
        } else {
            let a: u32 = range.parse().ok()?;
            (a, if item.contains('/') { max } else { a })
        };
        if from < min || to > max || from > to {
            return None;
        }
        for value in (from..=to).step_by(step as usize) {
            set |= 1 << value;
        }
    }
    Some(set)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

        /// Any text a tenant sends parses or is refused, and a parsed schedule names slots.
        #[test]
        fn any_text_parses_or_is_refused(expr in "(@every )?[0-9*/,\\- a-zü分\u{0}-\u{7f}\u{10000}]{0,24}") {
            if let Some(schedule) = Schedule::parse(&expr) {
                let now = at("2026-11-24T10:37:20Z");
                if let Some(slot) = schedule.last_slot(now) {
                    prop_assert!(slot <= now);
                }
            }
        }

        #[test]
        fn any_unicode_parses_or_is_refused(expr in "\\PC{0,16}", every in proptest::bool::ANY) {
            let expr = if every { format!("@every {expr}") } else { expr };
            let _ = Schedule::parse(&expr);
        }
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn slots() {
        let now = at("2026-11-24T10:37:20Z");
        let slot = |e: &str| Schedule::parse(e).unwrap().last_slot(now).unwrap();
        assert_eq!(slot("@every 15m"), at("2026-11-24T10:30:00Z"));
        assert_eq!(slot("@every 1d"), at("2026-11-24T00:00:00Z"));
        assert_eq!(slot("*/10 * * * *"), at("2026-11-24T10:30:00Z"));
        assert_eq!(slot("0 */6 * * *"), at("2026-11-24T06:00:00Z"));
        assert_eq!(slot("45 10 * * *"), at("2026-11-23T10:45:00Z"));
        // 2026-11-24 is a Tuesday: Mondays at 9.
        assert_eq!(slot("0 9 * * 1"), at("2026-11-23T09:00:00Z"));
        assert_eq!(slot("0 0 1 * *"), at("2026-11-01T00:00:00Z"));
        assert_eq!(slot("0 0 * * 7"), at("2026-11-22T00:00:00Z"));
        // Day of month or day of week, when both are restricted.
        assert_eq!(slot("0 0 1 * 2"), at("2026-11-24T00:00:00Z"));
        assert_eq!(slot("37 10 * * *"), at("2026-11-24T10:37:00Z"));
    }

    #[test]
    fn bad_expressions() {
        for bad in [
            "",
            "@every 0m",
            "@every 5s",
            "* * * *",
            "60 * * * *",
            "* 24 * * *",
            "* * 0 * *",
            "*/0 * * * *",
            "5-1 * * * *",
            "x * * * *",
            "@every 1ü",
            "@every 5分",
            "@every ü",
            "@every ",
            "* * * * 分",
        ] {
            assert_eq!(Schedule::parse(bad), None, "{bad}");
        }
    }
}
