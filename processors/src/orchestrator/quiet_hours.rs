//! Quiet hours in the recipient's own time zone. The window is compared on local
//! wall-clock time and its end is found as a local date and time turned back into an
//! instant with the zone's rules of that day, so the 23- and 25-hour days of a DST
//! change hold a message exactly until the local end (08:00 stays 08:00).

use crate::topology::QuietHours;
use jiff::tz::TimeZone;
use jiff::Timestamp;

/// The recipient's zone: their own when known and valid, else the configured default.
pub fn zone_of(timezone: Option<&str>, quiet: &QuietHours) -> TimeZone {
    timezone.and_then(|name| TimeZone::get(name).ok()).unwrap_or_else(|| quiet.default_timezone.clone())
}

/// When quiet hours end, if `now` (ms) is inside them in `zone`.
pub fn quiet_until(now: i64, zone: &TimeZone, quiet: &QuietHours) -> Option<i64> {
    let local = Timestamp::from_millisecond(now).ok()?.to_zoned_datetime(zone.clone());
    let time = local.time();
    let inside = if quiet.start < quiet.end {
        quiet.start <= time && time < quiet.end
    } else {
        // Crosses midnight: 22:00-08:00 is 22:00..24:00 and 00:00..08:00.
        time >= quiet.start || time < quiet.end
    };
    if !inside {
        return None;
    }
    let end_date = if time < quiet.end { local.date() } else { local.date().tomorrow().ok()? };
    // A local end that does not exist that day (inside a spring-forward gap) is read
    // with the offset before the change, as a clock not yet moved forward would: 02:30
    // becomes 03:30.
    let end = end_date.to_datetime(quiet.end).to_zoned_datetime(zone.clone()).ok()?;
    Some(end.timestamp().as_millisecond().max(now + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(text: &str) -> i64 {
        text.parse::<Timestamp>().unwrap().as_millisecond()
    }

    fn seed() -> QuietHours {
        QuietHours::parse("22:00-08:00", "UTC").unwrap()
    }

    #[test]
    fn crosses_midnight_in_the_recipients_zone() {
        let brisbane = TimeZone::get("Australia/Brisbane").unwrap(); // UTC+10, no DST
                                                                     // 21:59:59 local is outside, 22:00 inside, 07:59:59 inside, 08:00 outside.
        assert_eq!(quiet_until(ms("2026-03-10T11:59:59Z"), &brisbane, &seed()), None);
        let end = ms("2026-03-10T22:00:00Z"); // 08:00 on the 11th in Brisbane
        assert_eq!(quiet_until(ms("2026-03-10T12:00:00Z"), &brisbane, &seed()), Some(end));
        assert_eq!(quiet_until(ms("2026-03-10T14:30:00Z"), &brisbane, &seed()), Some(end), "after midnight");
        assert_eq!(quiet_until(ms("2026-03-10T21:59:59Z"), &brisbane, &seed()), Some(end));
        assert_eq!(quiet_until(ms("2026-03-10T22:00:00Z"), &brisbane, &seed()), None);
    }

    #[test]
    fn utc_minus_five() {
        let bogota = TimeZone::get("America/Bogota").unwrap(); // UTC-5, no DST
                                                               // 23:00 local on the 10th is 04:00 UTC on the 11th; the end is 08:00 local = 13:00 UTC.
        assert_eq!(quiet_until(ms("2026-03-11T04:00:00Z"), &bogota, &seed()), Some(ms("2026-03-11T13:00:00Z")));
        assert_eq!(quiet_until(ms("2026-03-11T13:00:00Z"), &bogota, &seed()), None);
    }

    #[test]
    fn dst_days_keep_the_local_end() {
        let new_york = TimeZone::get("America/New_York").unwrap();
        // Spring forward on 2026-03-08 (02:00 → 03:00): 22:00 EST on the 7th is 03:00Z;
        // 08:00 EDT on the 8th is 12:00Z, only 9 hours later.
        assert_eq!(quiet_until(ms("2026-03-08T03:00:00Z"), &new_york, &seed()), Some(ms("2026-03-08T12:00:00Z")));
        // Fall back on 2026-11-01 (02:00 → 01:00): 22:00 EDT on Oct 31 is 02:00Z;
        // 08:00 EST on Nov 1 is 13:00Z, 11 hours later.
        assert_eq!(quiet_until(ms("2026-11-01T02:00:00Z"), &new_york, &seed()), Some(ms("2026-11-01T13:00:00Z")));
        // Both 01:30s of the repeated hour are quiet.
        assert!(quiet_until(ms("2026-11-01T05:30:00Z"), &new_york, &seed()).is_some());
        assert!(quiet_until(ms("2026-11-01T06:30:00Z"), &new_york, &seed()).is_some());
    }

    #[test]
    fn an_end_inside_the_spring_forward_gap_moves_with_the_clocks() {
        let quiet = QuietHours::parse("23:00-02:30", "UTC").unwrap();
        let new_york = TimeZone::get("America/New_York").unwrap();
        // 02:30 does not exist on 2026-03-08: the hold ends at 03:30 EDT = 07:30Z.
        let until = quiet_until(ms("2026-03-08T05:00:00Z"), &new_york, &quiet).unwrap();
        assert_eq!(until, ms("2026-03-08T07:30:00Z"));
        assert_eq!(quiet_until(until, &new_york, &quiet), None, "released outside quiet hours");
    }

    #[test]
    fn same_day_window_and_unknown_zone() {
        let quiet = QuietHours::parse("12:00-13:00", "Europe/Berlin").unwrap();
        let zone = zone_of(Some("Mars/Olympus"), &quiet);
        // Berlin is UTC+1 in January.
        assert_eq!(quiet_until(ms("2026-01-05T11:30:00Z"), &zone, &quiet), Some(ms("2026-01-05T12:00:00Z")));
        assert_eq!(quiet_until(ms("2026-01-05T12:00:00Z"), &zone, &quiet), None);
        assert!(QuietHours::parse("22:00", "UTC").is_err());
        assert!(QuietHours::parse("22:00-22:00", "UTC").is_err());
        assert!(QuietHours::parse("22:00-08:00", "Nowhere/Land").is_err());
    }
}
