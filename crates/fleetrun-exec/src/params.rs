//! Splitting bk-job's one-string script parameters into arguments.
//!
//! `shell-words` was considered and not used: it treats a word starting with
//! `#` as a comment and silently drops the rest of the line (here the rest of
//! the parameters, since newlines become spaces), and its error does not say
//! which quote is open.

use std::iter::{Enumerate, Peekable};

/// A parameter string that cannot be split.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    /// A `'` opened at `column` (1-based, in characters) is never closed.
    #[error("unterminated single quote at column {column}")]
    UnterminatedSingleQuote {
        /// Where the quote opens.
        column: usize,
    },
    /// A `"` opened at `column` (1-based, in characters) is never closed.
    #[error("unterminated double quote at column {column}")]
    UnterminatedDoubleQuote {
        /// Where the quote opens.
        column: usize,
    },
}

/// Splits bk-job's `script_param` into arguments the way a POSIX shell splits
/// words, without expanding or executing anything.
///
/// Newlines (and carriage returns) first become spaces, as bk-job does. Then
/// words are separated by spaces and tabs; `'...'` keeps everything literal;
/// `"..."` keeps everything literal except `\"`, `\\`, `\$` and `` \` ``,
/// which lose their backslash; outside quotes a backslash makes the next
/// character literal (a trailing backslash stays). `$(...)`, `$VAR`, `~`,
/// globs and `#` arrive in the script as the text they are.
pub fn split_params(param: &str) -> Result<Vec<String>, ParamError> {
    let flattened = param.chars().map(|c| match c {
        '\n' | '\r' => ' ',
        other => other,
    });
    let mut chars = flattened.enumerate().peekable();
    let mut words = Vec::new();
    let mut word = String::new();
    // A word may be empty (`''`), so "inside a word" is tracked apart from
    // the text collected.
    let mut in_word = false;
    while let Some((index, c)) = chars.next() {
        match c {
            ' ' | '\t' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
                continue;
            }
            '\\' => word.push(chars.next().map_or('\\', |(_, next)| next)),
            '\'' => single_quoted(&mut chars, &mut word, index)?,
            '"' => double_quoted(&mut chars, &mut word, index)?,
            other => word.push(other),
        }
        in_word = true;
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

type Chars<I> = Peekable<Enumerate<I>>;

/// Copies up to the closing `'`.
fn single_quoted<I: Iterator<Item = char>>(
    chars: &mut Chars<I>,
    word: &mut String,
    open: usize,
) -> Result<(), ParamError> {
    loop {
        match chars.next() {
            None => return Err(ParamError::UnterminatedSingleQuote { column: open + 1 }),
            Some((_, '\'')) => return Ok(()),
            Some((_, c)) => word.push(c),
        }
    }
}

/// Copies up to the closing `"`, removing the backslash of the escapes a
/// shell honours there.
fn double_quoted<I: Iterator<Item = char>>(
    chars: &mut Chars<I>,
    word: &mut String,
    open: usize,
) -> Result<(), ParamError> {
    loop {
        match chars.next() {
            None => return Err(ParamError::UnterminatedDoubleQuote { column: open + 1 }),
            Some((_, '"')) => return Ok(()),
            Some((_, '\\')) => match chars.peek() {
                Some(&(_, escaped @ ('"' | '\\' | '$' | '`'))) => {
                    word.push(escaped);
                    chars.next();
                }
                _ => word.push('\\'),
            },
            Some((_, c)) => word.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(input: &str, expected: &[&str]) {
        assert_eq!(split_params(input).unwrap(), expected, "input: {input:?}");
    }

    #[track_caller]
    fn check_err(input: &str, expected: ParamError) {
        assert_eq!(split_params(input), Err(expected), "input: {input:?}");
    }

    #[test]
    fn plain_words() {
        check("", &[]);
        check("   \t ", &[]);
        check("a", &["a"]);
        check("a b  c", &["a", "b", "c"]);
        check("\ta\t\tb\t", &["a", "b"]);
        check("  lead trail  ", &["lead", "trail"]);
    }

    #[test]
    fn newlines_become_spaces_first() {
        check("a\nb", &["a", "b"]);
        check("a\r\nb\n", &["a", "b"]);
        check("'x\ny'", &["x y"]);
        check("\"x\ny\"", &["x y"]);
        // A backslash before a newline escapes the space it became.
        check("a\\\nb", &["a b"]);
    }

    #[test]
    fn single_quotes_keep_everything() {
        check("'a b'", &["a b"]);
        check("''", &[""]);
        check("'' ''", &["", ""]);
        check(r"'\'", &[r"\"]);
        check(r#"'a"b'"#, &[r#"a"b"#]);
        check(
            "'$HOME' '$(rm -rf /)' '`id`'",
            &["$HOME", "$(rm -rf /)", "`id`"],
        );
    }

    #[test]
    fn double_quotes_honour_four_escapes() {
        check(r#""a b""#, &["a b"]);
        check(r#""""#, &[""]);
        check(r#""say \"hi\"""#, &[r#"say "hi""#]);
        check(r#""back\\slash""#, &[r"back\slash"]);
        check(r#""\$HOME""#, &["$HOME"]);
        check(r#""\`id\`""#, &["`id`"]);
        check(r#""\n\a\'""#, &[r"\n\a\'"]);
        check(r#""it's""#, &["it's"]);
    }

    #[test]
    fn backslash_outside_quotes() {
        check(r"a\ b", &["a b"]);
        check(r"\'", &["'"]);
        check(r#"\""#, &["\""]);
        check(r"\\", &[r"\"]);
        check(r"\$HOME", &["$HOME"]);
        check(r"trailing\", &[r"trailing\"]);
        check(r"\", &[r"\"]);
    }

    #[test]
    fn quotes_join_adjacent_text() {
        check(r#"a'b c'"d e"f"#, &["ab cd ef"]);
        check(r#"--name="John Smith""#, &["--name=John Smith"]);
        check(r#"x''y"#, &["xy"]);
    }

    #[test]
    fn nothing_is_expanded_or_executed() {
        check("$(rm -rf /)", &["$(rm", "-rf", "/)"]);
        check(r#""$(rm -rf /)""#, &["$(rm -rf /)"]);
        check(
            "$HOME ~ ~root * ?.txt [ab]",
            &["$HOME", "~", "~root", "*", "?.txt", "[ab]"],
        );
        check(
            "`reboot` a;b a|b a&&b >out <in",
            &["`reboot`", "a;b", "a|b", "a&&b", ">out", "<in"],
        );
        check("a # not a comment", &["a", "#", "not", "a", "comment"]);
        check("${IFS} \"${PATH}\"", &["${IFS}", "${PATH}"]);
    }

    #[test]
    fn non_ascii_passes_through() {
        check("日本 'ü ß' \u{a0}x", &["日本", "ü ß", "\u{a0}x"]);
    }

    #[test]
    fn unterminated_quotes_are_named() {
        check_err("'abc", ParamError::UnterminatedSingleQuote { column: 1 });
        check_err("ab 'c d", ParamError::UnterminatedSingleQuote { column: 4 });
        check_err(r#"x "y"#, ParamError::UnterminatedDoubleQuote { column: 3 });
        check_err(r#""\""#, ParamError::UnterminatedDoubleQuote { column: 1 });
        check_err(
            r#"日 "x"#,
            ParamError::UnterminatedDoubleQuote { column: 3 },
        );
        check_err(
            r#"'"' ""#,
            ParamError::UnterminatedDoubleQuote { column: 5 },
        );
        assert_eq!(
            split_params("a 'b").unwrap_err().to_string(),
            "unterminated single quote at column 3"
        );
    }
}
