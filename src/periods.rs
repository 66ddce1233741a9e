//! UTC calendar periods of quotas: the day and the month a moment falls in, their
//! ends (for `Retry-After` and the usage endpoint) and their Redis keys.

use std::time::{SystemTime, UNIX_EPOCH};

/// The UTC day and month a moment falls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Periods {
    pub now: u64,
    /// Days since 1970-01-01.
    pub day: u64,
    /// `year * 12 + month - 1`.
    pub month: u64,
    pub day_end: u64,
    pub month_end: u64,
}

/// Howard Hinnant's `civil_from_days`: (year, month 1-12, day 1-31).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Days since 1970-01-01 of a civil date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl Periods {
    pub fn at(now: u64) -> Periods {
        let day = now / 86_400;
        let (y, m, _) = civil(day as i64);
        let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
        Periods {
            now,
            day,
            month: (y * 12 + i64::from(m) - 1) as u64,
            day_end: (day + 1) * 86_400,
            month_end: (days_from_civil(ny, nm, 1) * 86_400) as u64,
        }
    }

    pub fn current() -> Periods {
        Periods::at(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        )
    }

    /// `2026-11-27`
    pub fn day_label(&self) -> String {
        let (y, m, d) = civil(self.day as i64);
        format!("{y:04}-{m:02}-{d:02}")
    }

    /// `2026-11`
    pub fn month_label(&self) -> String {
        format!("{:04}-{:02}", self.month / 12, self.month % 12 + 1)
    }

    pub(crate) fn day_key(&self, tenant: &str) -> String {
        crate::store::key(tenant, &format!("day:{}", self.day_label()))
    }

    pub(crate) fn month_key(&self, tenant: &str) -> String {
        crate::store::key(tenant, &format!("month:{}", self.month_label()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_in_utc() {
        // 2026-11-27T07:00:00Z
        let p = Periods::at(1_795_762_800);
        assert_eq!(p.day_label(), "2026-11-27");
        assert_eq!(p.month_label(), "2026-11");
        assert_eq!(p.day_end, 1_795_824_000); // 2026-11-28T00:00:00Z
        assert_eq!(p.month_end, 1_796_083_200); // 2026-12-01T00:00:00Z
                                                // December rolls into January of the next year; 2028 is a leap year.
        let p = Periods::at(1_798_761_600 - 1); // 2026-12-31T23:59:59Z
        assert_eq!(p.month_label(), "2026-12");
        assert_eq!(p.month_end, 1_798_761_600);
        assert_eq!(Periods::at(p.month_end).month_label(), "2027-01");
        let p = Periods::at(days_from_civil(2028, 2, 29) as u64 * 86_400);
        assert_eq!(p.day_label(), "2028-02-29");
        assert_eq!(p.month_end, days_from_civil(2028, 3, 1) as u64 * 86_400);
    }
}
