//! bk-job's rolling expression: how a step's hosts are cut into batches.
//!
//! An expression is parts separated by single spaces. Each part sizes one batch: `N` hosts,
//! `N%` of all the step's hosts (rounded up), `+N` the previous batch plus N, `*N` the previous
//! batch times N. Batch k takes part k; once the parts run out, the last part repeats. A batch
//! never takes more hosts than remain, and the batches take the hosts in their order.
//!
//! This follows bk-job's parser and resolver (`engine/rolling/RollingExpr` and
//! `RollingBatchExecuteObjectsResolver`) in every case a client can observe: a leading space or
//! two spaces in a row leave an empty part, which is invalid, while trailing spaces are dropped
//! (Java's `String.split`); each part is trimmed; `0`, `0%` and percentages above 100 are
//! invalid; `+N` and `*N` as the first part mean N hosts; a step that would take more than
//! [`MAX_SERIAL_BATCHES`] + 1 batches is refused (bk-job checks the count before it adds a
//! batch, so 501 pass and 502 do not).

use std::fmt;

/// bk-job's `MAX_ALLOWED_ROLLING_BATCH_SIZE`: the limit named in the error for too many batches.
pub const MAX_SERIAL_BATCHES: usize = 500;

/// One part of an expression: the size rule of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// `N`: N hosts.
    Quantity(u32),
    /// `N%`: N percent of all the step's hosts, rounded up (1 to 100).
    Percent(u32),
    /// `+N`: N more than the previous batch.
    Plus(u32),
    /// `*N`: N times the previous batch.
    Times(u32),
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Part::Quantity(n) => write!(f, "{n}"),
            Part::Percent(n) => write!(f, "{n}%"),
            Part::Plus(n) => write!(f, "+{n}"),
            Part::Times(n) => write!(f, "*{n}"),
        }
    }
}

/// Why an expression cannot cut a step into batches.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExprError {
    /// Nothing but spaces.
    #[error("the expression is blank")]
    Blank,
    /// A part is none of `N`, `N%`, `+N`, `*N` with N a positive integer (a percentage at most
    /// 100). bk-job's INVALID_ROLLING_EXPR.
    #[error(
        "invalid rolling strategy: part {position} ({part:?}) is not N, N%, +N or *N with N a positive integer (N% at most 100%), parts separated by one space"
    )]
    InvalidPart { position: usize, part: String },
    /// The expression would make more batches than bk-job allows. bk-job's
    /// EXCEED_MAX_ALLOWED_BATCH_SIZE.
    #[error("rolling batch can not be greater than {limit}")]
    TooManyBatches { limit: usize },
}

impl ExprError {
    /// bk-job's code for this error.
    pub fn code(&self) -> i64 {
        match self {
            ExprError::Blank => 1_240_003,
            ExprError::InvalidPart { .. } => 1_244_026,
            ExprError::TooManyBatches { .. } => 1_244_027,
        }
    }
}

/// A parsed rolling expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expression {
    parts: Vec<Part>,
}

impl Expression {
    /// Parses `text` as bk-job does.
    pub fn parse(text: &str) -> Result<Self, ExprError> {
        if text.trim().is_empty() {
            return Err(ExprError::Blank);
        }
        // Java's split(" ") drops trailing empty strings but keeps leading and inner ones.
        let pieces: Vec<&str> = text.split(' ').collect();
        let kept = pieces.len() - pieces.iter().rev().take_while(|p| p.is_empty()).count();
        let parts = pieces[..kept]
            .iter()
            .enumerate()
            .map(|(i, piece)| {
                parse_part(java_trim(piece)).ok_or_else(|| ExprError::InvalidPart {
                    position: i + 1,
                    part: (*piece).to_owned(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { parts })
    }

    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// The size of each batch for `total` hosts, in order; their sum is `total`.
    pub fn batch_sizes(&self, total: usize) -> Result<Vec<usize>, ExprError> {
        let mut sizes: Vec<usize> = Vec::new();
        let mut remaining = total;
        while remaining > 0 {
            if sizes.len() > MAX_SERIAL_BATCHES {
                return Err(ExprError::TooManyBatches {
                    limit: MAX_SERIAL_BATCHES,
                });
            }
            let part = self.parts[sizes.len().min(self.parts.len() - 1)];
            let previous = sizes.last().copied();
            let wanted = match part {
                Part::Quantity(n) => n as usize,
                // Rounded up, from the step's total, not from what remains.
                Part::Percent(p) => (total * p as usize).div_ceil(100),
                Part::Plus(n) => previous.map_or(n as usize, |s| s.saturating_add(n as usize)),
                Part::Times(n) => previous.map_or(n as usize, |s| s.saturating_mul(n as usize)),
            };
            let size = wanted.min(remaining);
            sizes.push(size);
            remaining -= size;
        }
        Ok(sizes)
    }

    /// Cuts `hosts` into batches, in order.
    pub fn split<T: Clone>(&self, hosts: &[T]) -> Result<Vec<Vec<T>>, ExprError> {
        let mut rest = hosts;
        Ok(self
            .batch_sizes(hosts.len())?
            .into_iter()
            .map(|size| {
                let (batch, tail) = rest.split_at(size);
                rest = tail;
                batch.to_vec()
            })
            .collect())
    }
}

impl fmt::Display for Expression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, part) in self.parts.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{part}")?;
        }
        Ok(())
    }
}

/// Java's `String.trim`: strips every character up to U+0020 at both ends.
fn java_trim(s: &str) -> &str {
    s.trim_matches(|c: char| c <= ' ')
}

/// One part, or None when it is no part at all (bk-job's parsers all answer null, or one
/// refuses a zero or a percentage over 100).
fn parse_part(part: &str) -> Option<Part> {
    let number = |digits: &str| -> Option<u32> {
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        // Java's Integer.parseInt: a number past i32 does not parse.
        let n: i32 = digits.parse().ok()?;
        u32::try_from(n).ok().filter(|&n| n > 0)
    };
    if let Some(digits) = part.strip_suffix('%') {
        return number(digits).filter(|&p| p <= 100).map(Part::Percent);
    }
    if let Some(digits) = part.strip_prefix('+') {
        return number(digits).map(Part::Plus);
    }
    if let Some(digits) = part.strip_prefix('*') {
        return number(digits).map(Part::Times);
    }
    number(part).map(Part::Quantity)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sizes(expr: &str, total: usize) -> Vec<usize> {
        Expression::parse(expr)
            .unwrap_or_else(|e| panic!("{expr:?}: {e}"))
            .batch_sizes(total)
            .unwrap_or_else(|e| panic!("{expr:?} on {total}: {e}"))
    }

    fn code(expr: &str) -> i64 {
        match Expression::parse(expr) {
            Ok(parsed) => panic!("{expr:?} parsed as {parsed}"),
            Err(e) => e.code(),
        }
    }

    /// bk-job's own guide (`rolling/guide/expr.en.md`), on 100 hosts.
    #[test]
    fn the_documented_examples() {
        assert_eq!(sizes("20", 100), [20; 5]);
        assert_eq!(sizes("30%", 100), [30, 30, 30, 10]);
        assert_eq!(sizes("5 *2", 100), [5, 10, 20, 40, 25]);
        assert_eq!(sizes("5 +10", 100), [5, 15, 25, 35, 20]);
        assert_eq!(sizes("20%", 100), [20; 5]);
        assert_eq!(sizes("10 20 20 20 100%", 100), [10, 20, 20, 20, 30]);
        // The example.
        assert_eq!(sizes("1 10% 30%", 100), [1, 10, 30, 30, 29]);
    }

    #[test]
    fn percentages_round_up_from_the_whole_step() {
        assert_eq!(sizes("10%", 5), [1, 1, 1, 1, 1]);
        assert_eq!(sizes("30%", 7), [3, 3, 1]);
        assert_eq!(sizes("34%", 3), [2, 1]);
        let mut twos = vec![2; 50];
        twos.push(1);
        assert_eq!(sizes("1%", 101), twos);
        assert_eq!(sizes("50%", 1), [1]);
        assert_eq!(sizes("100%", 9), [9]);
        // Later percentages still count from the total, not from what remains.
        assert_eq!(sizes("50% 10%", 10), [5, 1, 1, 1, 1, 1]);
    }

    #[test]
    fn increments_start_from_the_previous_batch() {
        assert_eq!(sizes("+3", 10), [3, 6, 1]);
        assert_eq!(sizes("*3", 20), [3, 9, 8]);
        assert_eq!(sizes("*1", 3), [1, 1, 1]);
        assert_eq!(sizes("2 *2 +1", 20), [2, 4, 5, 6, 3]);
        // The previous batch is what it took, cut by the hosts left.
        assert_eq!(sizes("10% +1", 10), [1, 2, 3, 4]);
        // Huge factors saturate instead of overflowing.
        assert_eq!(sizes("3 *2147483647 *2147483647", 10), [3, 7]);
    }

    #[test]
    fn more_batches_than_hosts() {
        assert_eq!(sizes("1 2 3 4 5", 2), [1, 1]);
        assert_eq!(sizes("10", 3), [3]);
        assert_eq!(sizes("1", 0), Vec::<usize>::new());
    }

    #[test]
    fn spaces_as_java_splits_them() {
        assert_eq!(sizes("1 2   ", 5), [1, 2, 2]);
        assert_eq!(sizes("1\t 2", 5), [1, 2, 2]);
        assert_eq!(code(" 1 2"), 1_244_026);
        assert_eq!(code("1  2"), 1_244_026);
        assert_eq!(code("1\t2"), 1_244_026);
        assert_eq!(code("   "), 1_240_003);
        assert_eq!(code(""), 1_240_003);
    }

    #[test]
    fn invalid_parts_get_bk_jobs_code() {
        for expr in [
            "0",
            "0%",
            "+0",
            "*0",
            "101%",
            "ten",
            "1.5",
            "-1",
            "%",
            "+",
            "*",
            "10%%",
            "+10%",
            "*2%",
            "1,2",
            "2147483648",
            "99999999999%",
            "１",
            "1 x",
        ] {
            assert_eq!(code(expr), 1_244_026, "{expr:?}");
        }
        let Err(ExprError::InvalidPart { position, part }) = Expression::parse("1 2 x") else {
            panic!("x parsed");
        };
        assert_eq!((position, part.as_str()), (3, "x"));
        // Leading zeros are read as Java reads them.
        assert_eq!(sizes("007", 10), [7, 3]);
        assert_eq!(sizes("2147483647", 10), [10]);
    }

    #[test]
    fn at_most_501_batches_as_bk_job_counts_them() {
        let expr = Expression::parse("1").unwrap();
        assert_eq!(expr.batch_sizes(501).unwrap().len(), 501);
        let err = expr.batch_sizes(502).unwrap_err();
        assert_eq!(err, ExprError::TooManyBatches { limit: 500 });
        assert_eq!(err.code(), 1_244_027);
        assert_eq!(err.to_string(), "rolling batch can not be greater than 500");
    }

    #[test]
    fn split_keeps_the_hosts_order() {
        let hosts: Vec<i64> = (1..=7).collect();
        let batches = Expression::parse("2 +1").unwrap().split(&hosts).unwrap();
        assert_eq!(batches, vec![vec![1, 2], vec![3, 4, 5], vec![6, 7]]);
    }

    #[test]
    fn display_round_trips() {
        let expr = Expression::parse("1 10% +2 *3").unwrap();
        assert_eq!(expr.to_string(), "1 10% +2 *3");
        assert_eq!(Expression::parse(&expr.to_string()).unwrap(), expr);
    }

    fn part() -> impl Strategy<Value = Part> {
        prop_oneof![
            (1u32..50).prop_map(Part::Quantity),
            (1u32..=100).prop_map(Part::Percent),
            (1u32..20).prop_map(Part::Plus),
            (1u32..5).prop_map(Part::Times),
        ]
    }

    proptest! {
        /// Every host lands in exactly one batch, the batches keep the hosts' order, no batch
        /// is empty, and only too many batches is refused.
        #[test]
        fn batches_partition_the_hosts(
            parts in prop::collection::vec(part(), 1..6),
            total in 0usize..3000,
        ) {
            let text = parts.iter().map(Part::to_string).collect::<Vec<_>>().join(" ");
            let expr = Expression::parse(&text).unwrap();
            prop_assert_eq!(expr.parts(), &parts[..]);
            let hosts: Vec<usize> = (0..total).collect();
            match expr.split(&hosts) {
                Ok(batches) => {
                    prop_assert!(batches.len() <= MAX_SERIAL_BATCHES + 1);
                    prop_assert!(batches.iter().all(|b| !b.is_empty()));
                    let flat: Vec<usize> = batches.concat();
                    prop_assert_eq!(flat, hosts);
                }
                Err(ExprError::TooManyBatches { .. }) => prop_assert!(total > MAX_SERIAL_BATCHES),
                Err(e) => prop_assert!(false, "{}", e),
            }
        }

        /// Whatever text comes in, parsing answers without a panic, and what parses cuts any
        /// number of hosts.
        #[test]
        fn any_text_parses_or_is_refused(text in "[ 0-9%+*a\t]{0,20}", total in 0usize..600) {
            if let Ok(expr) = Expression::parse(&text) {
                let _ = expr.batch_sizes(total);
            }
        }
    }
}
