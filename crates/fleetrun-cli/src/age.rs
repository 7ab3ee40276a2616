//! Ages and spans given on the command line: how far back `--since` looks (`fleetrun jobs`,
//! `fleetrun audit`) and how long `tokens create --ttl` keeps a token usable.

use std::time::Duration;

use crate::error::CliError;

/// The duration `option` was given: as humantime reads it (`90s`, `30m`, `2h`, `1d`, `1w`,
/// `1h 30m`, `1h30m`), or a bare number of hours (`2` is two hours), which is what these options
/// took before they read units. A refusal names `option`.
pub(crate) fn age(option: &str, text: &str) -> Result<Duration, CliError> {
    let trimmed = text.trim();
    if !trimmed.is_empty() && trimmed.bytes().all(|b| b.is_ascii_digit()) {
        return trimmed
            .parse::<u64>()
            .ok()
            .and_then(|hours| hours.checked_mul(3600))
            .map(Duration::from_secs)
            .ok_or_else(|| refused(option, text, &"too many hours"));
    }
    humantime::parse_duration(trimmed).map_err(|e| refused(option, text, &e))
}

/// [`age`] in whole milliseconds, as the API's times are.
pub(crate) fn age_ms(option: &str, text: &str) -> Result<i64, CliError> {
    let age = age(option, text)?;
    i64::try_from(age.as_millis()).map_err(|_| refused(option, text, &"too long"))
}

/// [`age`] in whole seconds; a part of a second is refused rather than dropped.
pub(crate) fn age_secs(option: &str, text: &str) -> Result<i64, CliError> {
    let age = age(option, text)?;
    if age.subsec_nanos() != 0 {
        return Err(refused(option, text, &"not a whole number of seconds"));
    }
    i64::try_from(age.as_secs()).map_err(|_| refused(option, text, &"too long"))
}

fn refused(option: &str, text: &str, why: &dyn std::fmt::Display) -> CliError {
    CliError::usage(format!(
        "{option} {text:?} is not an age like 30m, 24h or 7d: {why}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn since_ms(text: &str) -> Result<i64, CliError> {
        age_ms("--since", text)
    }

    fn ttl_secs(text: &str) -> Result<i64, CliError> {
        age_secs("--ttl", text)
    }

    #[test]
    fn ages_are_humantime_durations() {
        assert_eq!(since_ms("90s").unwrap(), 90_000);
        assert_eq!(since_ms("30m").unwrap(), 1_800_000);
        assert_eq!(since_ms("2h").unwrap(), 7_200_000);
        assert_eq!(since_ms("24h").unwrap(), 86_400_000);
        assert_eq!(since_ms("1d").unwrap(), 86_400_000);
        assert_eq!(since_ms("7d").unwrap(), 604_800_000);
        assert_eq!(since_ms("1w").unwrap(), 604_800_000);
        assert_eq!(since_ms("1h 30m").unwrap(), 5_400_000);
        assert_eq!(since_ms("1h30m").unwrap(), 5_400_000);
        assert_eq!(since_ms(" 30m ").unwrap(), 1_800_000);
        assert_eq!(age("--since", "1h30m").unwrap(), Duration::from_secs(5400));
    }

    #[test]
    fn a_bare_number_is_hours() {
        assert_eq!(since_ms("2").unwrap(), 7_200_000);
        assert_eq!(since_ms("0").unwrap(), 0);
        assert_eq!(since_ms("720").unwrap(), 2_592_000_000);
        assert_eq!(ttl_secs("2").unwrap(), 7200);
    }

    #[test]
    fn ttls_read_like_ages() {
        assert_eq!(ttl_secs("90s").unwrap(), 90);
        assert_eq!(ttl_secs("30m").unwrap(), 1800);
        assert_eq!(ttl_secs("7d").unwrap(), 604_800);
        // What `--since` takes, `--ttl` takes too.
        assert_eq!(ttl_secs("1w").unwrap(), 604_800);
        assert_eq!(ttl_secs("1h30m").unwrap(), 5400);
        assert_eq!(ttl_secs("1h 30m").unwrap(), 5400);
    }

    #[test]
    fn a_ttl_in_parts_of_a_second_is_refused() {
        let error = ttl_secs("1500ms").unwrap_err().to_string();
        assert!(error.contains("--ttl \"1500ms\""), "{error}");
        assert!(error.contains("whole number of seconds"), "{error}");
        assert_eq!(ttl_secs("2000ms").unwrap(), 2);
    }

    #[test]
    fn nonsense_is_refused_naming_the_option() {
        for bad in [
            "",
            "h",
            "d",
            "7x",
            "-1d",
            "-1",
            "1.5.2h",
            "99999999999999999d",
            "99999999999999999999",
            "5124095576030431h",
        ] {
            let error = since_ms(bad).expect_err(bad).to_string();
            assert!(error.contains("--since"), "{bad}: {error}");
            let error = ttl_secs(bad).expect_err(bad).to_string();
            assert!(error.contains("--ttl"), "{bad}: {error}");
        }
    }
}
