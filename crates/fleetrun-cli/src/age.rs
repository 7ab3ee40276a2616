//! Ages given to `--since`: how far back `fleetrun jobs` and `fleetrun audit` look.

use std::time::Duration;

use crate::error::CliError;

/// Milliseconds in an age: a duration as humantime reads it (`90s`, `30m`, `2h`, `1d`, `1w`,
/// `1h 30m`), or a bare number of hours (`2` is two hours), which is what `--since` took before
/// it read units.
pub(crate) fn age_ms(text: &str) -> Result<i64, CliError> {
    let trimmed = text.trim();
    let bad = |why: &dyn std::fmt::Display| {
        CliError::usage(format!(
            "--since {text:?} is not an age like 30m, 24h or 7d: {why}"
        ))
    };
    let age = if !trimmed.is_empty() && trimmed.bytes().all(|b| b.is_ascii_digit()) {
        trimmed
            .parse::<u64>()
            .ok()
            .and_then(|hours| hours.checked_mul(3600))
            .map(Duration::from_secs)
            .ok_or_else(|| bad(&"too many hours"))?
    } else {
        humantime::parse_duration(trimmed).map_err(|e| bad(&e))?
    };
    i64::try_from(age.as_millis()).map_err(|_| bad(&"too long ago"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_humantime_durations() {
        assert_eq!(age_ms("90s").unwrap(), 90_000);
        assert_eq!(age_ms("30m").unwrap(), 1_800_000);
        assert_eq!(age_ms("2h").unwrap(), 7_200_000);
        assert_eq!(age_ms("24h").unwrap(), 86_400_000);
        assert_eq!(age_ms("1d").unwrap(), 86_400_000);
        assert_eq!(age_ms("7d").unwrap(), 604_800_000);
        assert_eq!(age_ms("1w").unwrap(), 604_800_000);
        assert_eq!(age_ms("1h 30m").unwrap(), 5_400_000);
        assert_eq!(age_ms(" 30m ").unwrap(), 1_800_000);
    }

    #[test]
    fn a_bare_number_is_hours() {
        assert_eq!(age_ms("2").unwrap(), 7_200_000);
        assert_eq!(age_ms("0").unwrap(), 0);
        assert_eq!(age_ms("720").unwrap(), 2_592_000_000);
    }

    #[test]
    fn nonsense_is_refused_naming_the_option() {
        for bad in [
            "",
            "h",
            "d",
            "7x",
            "-1d",
            "1.5.2h",
            "99999999999999999d",
            "99999999999999999999",
            "5124095576030431h",
        ] {
            let error = age_ms(bad).expect_err(bad).to_string();
            assert!(error.contains("--since"), "{bad}: {error}");
        }
    }
}
