//! bk-job's variables in `file_target_path`: `[FILESRCIP]` (the source host's address, `:`
//! written `_`), `[DATE:pattern]` (Java's date letters `yyyy yy MM dd HH mm ss SSS`) and
//! `[DATEFMT:format]` (strftime's `%Y %y %m %d %H %M %S %%`), at the job's creation time in UTC.
//! A pattern that cannot be read stays as written, as bk-job leaves it.

/// The target path with its variables replaced.
pub fn resolve(template: &str, source_ip: &str, at_ms: i64) -> String {
    let with_ip = template.replace("[FILESRCIP]", &source_ip.replace(':', "_"));
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let dated = replace_macro(&with_ip, "[DATE:", |pattern| java_date(pattern, at));
    replace_macro(&dated, "[DATEFMT:", |format| strftime(format, at))
}

fn replace_macro(text: &str, open: &str, render: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(open) {
        let after = &rest[start + open.len()..];
        let Some(end) = after.find(']') else {
            break;
        };
        out.push_str(&rest[..start]);
        match render(&after[..end]) {
            Some(rendered) => out.push_str(&rendered),
            None => out.push_str(&rest[start..start + open.len() + end + 1]),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

fn java_date(pattern: &str, at: time::OffsetDateTime) -> Option<String> {
    let mut out = String::new();
    let chars: Vec<char> = pattern.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let run = chars[i..].iter().take_while(|x| **x == c).count();
        let field = match (c, run) {
            ('y', 4) => format!("{:04}", at.year()),
            ('y', 2) => format!("{:02}", at.year().rem_euclid(100)),
            ('M', 2) => format!("{:02}", u8::from(at.month())),
            ('d', 2) => format!("{:02}", at.day()),
            ('H', 2) => format!("{:02}", at.hour()),
            ('m', 2) => format!("{:02}", at.minute()),
            ('s', 2) => format!("{:02}", at.second()),
            ('S', 3) => format!("{:03}", at.millisecond()),
            (c, _) if c.is_ascii_alphabetic() => return None,
            (c, n) => std::iter::repeat_n(c, n).collect(),
        };
        out.push_str(&field);
        i += run;
    }
    Some(out)
}

fn strftime(format: &str, at: time::OffsetDateTime) -> Option<String> {
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let field = match chars.next()? {
            'Y' => format!("{:04}", at.year()),
            'y' => format!("{:02}", at.year().rem_euclid(100)),
            'm' => format!("{:02}", u8::from(at.month())),
            'd' => format!("{:02}", at.day()),
            'H' => format!("{:02}", at.hour()),
            'M' => format!("{:02}", at.minute()),
            'S' => format!("{:02}", at.second()),
            '%' => "%".to_owned(),
            _ => return None,
        };
        out.push_str(&field);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2024-03-05 07:08:09.123 UTC
    const AT: i64 = 1_709_622_489_123;

    #[test]
    fn variables_resolve_as_bk_job_resolves_them() {
        for (template, want) in [
            ("/data/[FILESRCIP]/", "/data/10.0.0.1/"),
            ("/d/[DATE:yyyy-MM-dd]/x", "/d/2024-03-05/x"),
            ("/d/[DATE:yyyyMMddHHmmss.SSS]", "/d/20240305070809.123"),
            ("/d/[DATEFMT:%Y%m%d_%H%M%S]", "/d/20240305_070809"),
            ("/d/[DATE:bogus]", "/d/[DATE:bogus]"),
            ("/d/[DATE:yyyy", "/d/[DATE:yyyy"),
            ("/plain", "/plain"),
        ] {
            assert_eq!(resolve(template, "10.0.0.1", AT), want, "{template}");
        }
        assert_eq!(resolve("/[FILESRCIP]", "fd00::1", AT), "/fd00__1");
    }
}
