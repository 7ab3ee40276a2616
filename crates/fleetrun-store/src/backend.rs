//! Where the store keeps its data: a SQLite file or a PostgreSQL database, named by the
//! controller's `database` setting, and what differs between the two.
//!
//! Queries are written once, in SQL both read (`$1` placeholders, `ON CONFLICT`), and run
//! through sqlx's `Any` driver; the few statements that must differ ask [`Dialect`].

use std::{fmt, path::PathBuf, str::FromStr, time::Duration};

use sqlx::{
    Any, Arguments as _, ConnectOptions as _, Connection as _, Encode, Type,
    any::{AnyArguments, AnyPoolOptions},
    postgres::PgConnectOptions,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous},
};

use crate::StoreError;

/// A database the store can open.
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    /// A SQLite file, created if missing (`sqlite:///var/lib/fleetrun/db.sqlite`, or a bare
    /// path).
    Sqlite(PathBuf),
    /// A PostgreSQL database (`postgres://user@host:5432/name`), which must exist.
    Postgres(String),
}

/// The `database` setting could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DatabaseParseError(String);

impl FromStr for Database {
    type Err = DatabaseParseError;

    /// `sqlite://PATH` (so `sqlite:///abs/path`), `sqlite:PATH`, `postgres://…` or
    /// `postgresql://…`; anything without a scheme is a SQLite file's path.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.is_empty() {
            return Err(DatabaseParseError("the database must not be empty".into()));
        }
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            PgConnectOptions::from_str(text)
                .map_err(|e| DatabaseParseError(format!("not a PostgreSQL connection URL: {e}")))?;
            return Ok(Self::Postgres(text.to_owned()));
        }
        if let Some(path) = text
            .strip_prefix("sqlite://")
            .or_else(|| text.strip_prefix("sqlite:"))
        {
            if path.is_empty() || path.contains('?') {
                return Err(DatabaseParseError(
                    "a SQLite database is `sqlite://` followed by the file's path, without options"
                        .into(),
                ));
            }
            return Ok(Self::Sqlite(PathBuf::from(path)));
        }
        if let Some((scheme, _)) = text.split_once("://") {
            return Err(DatabaseParseError(format!(
                "unknown database kind {scheme:?}: use sqlite:// or postgres://"
            )));
        }
        Ok(Self::Sqlite(PathBuf::from(text)))
    }
}

impl fmt::Display for Database {
    /// The database without its password, fit for logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
            Self::Postgres(url) => f.write_str(&redact_password(url)),
        }
    }
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Database({self})")
    }
}

/// `postgres://user:secret@host/db` as `postgres://user:***@host/db`.
fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((user_info, host)) => match user_info.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// Which SQL a statement that cannot be written once must be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// Whether `haystack` contains `needle` (both SQL expressions), case-sensitively.
    pub(crate) fn contains(self, haystack: &str, needle: &str) -> String {
        match self {
            Self::Sqlite => format!("instr({haystack}, {needle}) > 0"),
            Self::Postgres => format!("strpos({haystack}, {needle}) > 0"),
        }
    }

    /// Most bound values one statement may carry (SQLite's default limit is 32,766,
    /// PostgreSQL's 65,535).
    pub(crate) fn max_parameters(self) -> usize {
        match self {
            Self::Sqlite => 32_766,
            Self::Postgres => 65_535,
        }
    }
}

/// Connections that serve queries, per backend; on SQLite, and the one the store's writer keeps
/// for its group commits.
const SQLITE_CONNECTIONS: u32 = 4 + 1;
const POSTGRES_CONNECTIONS: u32 = 8;
/// Each connection's page cache, in KiB (64 pages of 4 KiB). In WAL mode a connection drops its
/// whole cache when it begins a read after another connection's commit, which the store's
/// writer makes every few milliseconds under load: a cache rarely outlives one transaction, and
/// dropping it costs in proportion to the pages it ever held (SQLite's default of 2,000 KiB
/// made that a tenth of a single-host job's instructions). A transaction that reads more
/// pages reads them again from the operating system's cache.
const SQLITE_CACHE_SIZE: &str = "PRAGMA cache_size = -256";
/// Pages a transaction may change before SQLite writes them to the WAL ahead of its commit:
/// SQLite's default follows the cache size, and a group commit or a job's creation can change
/// thousands of rows (a fan-out's hosts), which a 64-page cache would spill, some pages twice.
/// The cache grows past its size for them while the transaction lasts.
const SQLITE_CACHE_SPILL: &str = "PRAGMA cache_spill = 500";
/// How long a query waits for a connection before it fails (and the store reports the database
/// as refusing writes).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens the pool that serves queries, after bringing the schema up to date on a connection of
/// its own: a connection opened before a migration altered a table can prepare a statement
/// against the old columns, and sqlx then reads a row of the new shape with the old column list.
pub(crate) async fn connect(database: &Database) -> Result<(sqlx::AnyPool, Dialect), StoreError> {
    sqlx::any::install_default_drivers();
    match database {
        Database::Sqlite(path) => {
            let options = SqliteConnectOptions::new()
                .filename(path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .foreign_keys(true)
                .busy_timeout(Duration::from_secs(10));
            let mut migrating = options.connect().await?;
            crate::schema::migrate_sqlite(&mut migrating).await?;
            migrating.close().await?;
            // The `Any` driver takes a URL, which carries the file but not these settings: each
            // connection sets them itself (WAL is the file's, kept from the migration).
            let url = options.to_url_lossy();
            let pool = AnyPoolOptions::new()
                .max_connections(SQLITE_CONNECTIONS)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .after_connect(|connection, _| {
                    Box::pin(async move {
                        for pragma in [
                            "PRAGMA busy_timeout = 10000",
                            "PRAGMA synchronous = NORMAL",
                            "PRAGMA foreign_keys = ON",
                            SQLITE_CACHE_SIZE,
                            SQLITE_CACHE_SPILL,
                        ] {
                            sqlx::query(pragma).execute(&mut *connection).await?;
                        }
                        Ok(())
                    })
                })
                .connect(url.as_str())
                .await?;
            Ok((pool, Dialect::Sqlite))
        }
        Database::Postgres(url) => {
            let options = PgConnectOptions::from_str(url)?;
            let mut migrating = options.connect().await?;
            crate::schema::migrate_postgres(&mut migrating).await?;
            migrating.close().await?;
            let pool = AnyPoolOptions::new()
                .max_connections(POSTGRES_CONNECTIONS)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect(url)
                .await?;
            Ok((pool, Dialect::Postgres))
        }
    }
}

/// The advisory lock a controller holds on its PostgreSQL database ("fleetrun" in ASCII): a
/// controller alone on it (no `[cluster]`) holds it exclusively; controllers sharing the database
/// hold it shared, so that neither kind starts beside the other.
/// PostgreSQL scopes advisory locks to the database, so databases on one server do not contend.
const SOLE_USE_LOCK: i64 = 0x666c_6565_7472_756e;

/// The advisory lock of the cluster member called `name`: FNV-1a of the name, mixed into
/// [`SOLE_USE_LOCK`].
fn name_lock(name: &str) -> i64 {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    SOLE_USE_LOCK ^ i64::from_ne_bytes(hash.to_ne_bytes())
}

/// How long a starting controller waits for the database's lock before it is refused.
const SOLE_USE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Takes the database's controller lock on a session of its own and returns that session, which
/// keeps the lock until it closes (when the controller stops or dies).
///
/// Without `member` (a controller alone on the database), the lock is exclusive: a second
/// controller is refused here, since at start it would end the first one's running jobs as
/// interrupted and deliver their callbacks a second time. With `member` (the name of a controller
/// sharing the database through leases, `cluster.rs`), the lock is shared with the other members
/// and the name's own lock is taken exclusively: a second live controller of the same name is
/// refused, since at start it would take up the first one's jobs (their leases carry the name)
/// while it still runs them.
pub(crate) async fn claim_sole_use(
    url: &str,
    member: Option<&str>,
) -> Result<sqlx::PgConnection, StoreError> {
    let options = PgConnectOptions::from_str(url)?;
    let mut session = options.connect().await?;
    // A controller that was just killed holds the lock until PostgreSQL notices its session is
    // gone (its backend may still be finishing a statement): a restart waits for that a little
    // while; a controller that is alive keeps it, and this one is refused after the wait.
    let deadline = std::time::Instant::now() + SOLE_USE_WAIT;
    let (database_lock, name_lock) = match member {
        None => ("SELECT pg_try_advisory_lock($1)", None),
        Some(name) => (
            "SELECT pg_try_advisory_lock_shared($1)",
            Some(name_lock(name)),
        ),
    };
    let mut database_held = false;
    let held = loop {
        if !database_held {
            database_held = sqlx::query_scalar(database_lock)
                .bind(SOLE_USE_LOCK)
                .fetch_one(&mut session)
                .await?;
        }
        let held = database_held
            && match name_lock {
                None => true,
                Some(lock) => {
                    sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                        .bind(lock)
                        .fetch_one(&mut session)
                        .await?
                }
            };
        if held || std::time::Instant::now() >= deadline {
            break held;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    if held {
        return Ok(session);
    }
    Err(StoreError::InUse(match member {
        None => "another controller is using this PostgreSQL database; one controller per \
                 database (stop the other, or give this one a database of its own; controllers \
                 sharing a database each need a [cluster] section)"
            .to_owned(),
        Some(name) if database_held => format!(
            "another controller named {name:?} is using this PostgreSQL database; one live \
             controller per name (stop the other, or give each controller sharing the database \
             its own [cluster] name)"
        ),
        Some(_) => "a controller without a [cluster] section is using this PostgreSQL \
                    database alone; controllers sharing a database each need a [cluster] section"
            .to_owned(),
    }))
}

/// A statement built piece by piece, its values bound in the order their placeholders appear:
/// `$1, $2, …` for PostgreSQL (sqlx's `QueryBuilder` writes `?` for the `Any` driver, which
/// PostgreSQL does not take), `?` for SQLite, where binding a numbered or named placeholder
/// looks its name up in a list, so that thousands of them (a multi-row insert) cost time
/// quadratic in their number: 10,000 hosts' rows took seconds instead of milliseconds.
///
/// Rows ([`Self::push_values`]) go to PostgreSQL as one array per column, which it reads with
/// `unnest`: a row of values is no longer a row of placeholders for the server to parse and
/// plan (a 10,000-host job's rows took it 80–120 ms that way, most of the time a fan-out took
/// to be accepted), and the statement's text is the same for any number of rows, so it stays
/// prepared.
pub(crate) struct Statement<'q> {
    sql: String,
    arguments: AnyArguments<'q>,
    dialect: Dialect,
    /// Rows written by [`Self::push_values`].
    rows: usize,
    /// PostgreSQL: the columns of the rows being written, each an array literal being built.
    columns: Vec<Column>,
}

/// One column of [`Statement::push_values`]'s rows on PostgreSQL.
struct Column {
    /// The element type of its array (`int8`, `text`, …).
    element: &'static str,
    /// `{a,b,…` so far; closed and bound when the rows end.
    literal: String,
    /// Set when the column is an SQL expression, the same in every row, instead of values.
    sql: Option<String>,
}

/// A multi-row statement of at most this many rows is kept prepared (in the connection's
/// statement cache) on SQLite: the group commits of a controller running jobs one or a few
/// hosts at a time repeat these few shapes, and preparing a statement anew cost more than
/// executing it (a fifth of a single-host job's instructions on SQLite went to parsing SQL).
/// About ten statement kinds at four shapes each share sqlx's cache of 100 per connection
/// (least recently used first out) with the store's fixed statements, of which a connection
/// uses a few dozen at a time; a larger statement is prepared for its one use, its cost shared
/// by its rows. On PostgreSQL a statement's text does not depend on its rows.
const PREPARED_ROWS: usize = 4;

impl<'q> Statement<'q> {
    pub(crate) fn new(dialect: Dialect, sql: impl Into<String>) -> Self {
        Self {
            sql: sql.into(),
            arguments: AnyArguments::default(),
            dialect,
            rows: 0,
            columns: Vec::new(),
        }
    }

    pub(crate) fn push(&mut self, sql: &str) -> &mut Self {
        self.sql.push_str(sql);
        self
    }

    /// Binds a value and writes its placeholder.
    pub(crate) fn push_bind<T>(&mut self, value: T) -> &mut Self
    where
        T: 'q + Encode<'q, Any> + Type<Any>,
    {
        let placeholder = self.bind(value);
        self.sql.push_str(&placeholder);
        self
    }

    /// Binds a value and returns its placeholder, to be written next.
    pub(crate) fn bind<T>(&mut self, value: T) -> String
    where
        T: 'q + Encode<'q, Any> + Type<Any>,
    {
        // The `Any` driver's encoders do not fail (as with sqlx's own builder).
        self.arguments
            .add(value)
            .expect("encoding a value for the Any driver");
        match self.dialect {
            Dialect::Sqlite => "?".to_owned(),
            Dialect::Postgres => format!("${}", self.arguments.len()),
        }
    }

    /// Writes rows, one per item, their values given by `row`: ` VALUES (…), (…)` on SQLite;
    /// on PostgreSQL ` SELECT … FROM unnest($1::int8[], …)` with the same column names
    /// (`column1`, `column2`, … by position), so either can stand where the other does (after
    /// `INSERT INTO t (…)`, as `FROM (…) AS v`, in a `WITH`). At least one item.
    pub(crate) fn push_values<I>(
        &mut self,
        items: I,
        mut row: impl FnMut(&mut Row<'_, 'q>, I::Item),
    ) where
        I: IntoIterator,
    {
        match self.dialect {
            Dialect::Sqlite => {
                self.sql.push_str(" VALUES ");
                for (i, item) in items.into_iter().enumerate() {
                    if i > 0 {
                        self.sql.push_str(", ");
                    }
                    self.sql.push('(');
                    row(
                        &mut Row {
                            statement: self,
                            column: 0,
                        },
                        item,
                    );
                    self.sql.push(')');
                    self.rows += 1;
                }
            }
            Dialect::Postgres => {
                self.columns.clear();
                for item in items {
                    let mut written = Row {
                        statement: self,
                        column: 0,
                    };
                    row(&mut written, item);
                    // `unnest` would pad a short column with NULLs where VALUES refuses.
                    debug_assert_eq!(written.column, self.columns.len(), "a row of every column");
                    self.rows += 1;
                }
                // An empty `unnest()` is no statement; every caller has rows to write.
                assert!(self.rows > 0, "push_values without rows");
                let columns = std::mem::take(&mut self.columns);
                let mut select = String::from(" SELECT ");
                let mut arrays = Vec::new();
                let mut names = Vec::new();
                for (i, column) in columns.into_iter().enumerate() {
                    let name = format!("column{}", i + 1);
                    if i > 0 {
                        select.push_str(", ");
                    }
                    match column.sql {
                        Some(sql) => select.push_str(&format!("{sql} AS {name}")),
                        None => {
                            let mut literal = column.literal;
                            literal.push('}');
                            let placeholder = self.bind(literal);
                            arrays.push(format!("{placeholder}::{}[]", column.element));
                            select.push_str(&format!("u.{name}"));
                            names.push(name);
                        }
                    }
                }
                select.push_str(&format!(
                    " FROM unnest({}) AS u({})",
                    arrays.join(", "),
                    names.join(", ")
                ));
                self.sql.push_str(&select);
            }
        }
    }

    pub(crate) fn build(&mut self) -> sqlx::query::Query<'_, Any, AnyArguments<'_>> {
        let arguments: AnyArguments<'_> = std::mem::take(&mut self.arguments);
        // On SQLite kept prepared only for a few rows: the text changes with the number of
        // rows, so each larger shape would take a place in the connection's statement cache
        // for one use, pushing out statements that are used again. A statement built without
        // `push_values` (filters chosen per call) is not kept either.
        let persistent = match self.dialect {
            Dialect::Sqlite => (1..=PREPARED_ROWS).contains(&self.rows),
            Dialect::Postgres => self.rows > 0,
        };
        sqlx::query_with(&self.sql, arguments).persistent(persistent)
    }
}

/// One row of a [`Statement::push_values`].
pub(crate) struct Row<'s, 'q> {
    statement: &'s mut Statement<'q>,
    /// The row's next column.
    column: usize,
}

impl<'q> Row<'_, 'q> {
    pub(crate) fn push_bind<T>(&mut self, value: T) -> &mut Self
    where
        T: 'q + Encode<'q, Any> + Type<Any> + ArrayElement,
    {
        match self.statement.dialect {
            Dialect::Sqlite => {
                if self.column > 0 {
                    self.statement.sql.push_str(", ");
                }
                self.statement.push_bind(value);
            }
            Dialect::Postgres => {
                let column = self.column(T::ELEMENT);
                debug_assert!(
                    column.sql.is_none(),
                    "a column of values or of SQL, not both"
                );
                if column.literal.len() > 1 {
                    column.literal.push(',');
                }
                value.write_element(&mut column.literal);
            }
        }
        self.column += 1;
        self
    }

    /// Writes an SQL expression as the row's next value (a constant, or the database's clock):
    /// the same in every row.
    pub(crate) fn push_sql(&mut self, sql: &str) -> &mut Self {
        match self.statement.dialect {
            Dialect::Sqlite => {
                if self.column > 0 {
                    self.statement.sql.push_str(", ");
                }
                self.statement.sql.push_str(sql);
            }
            Dialect::Postgres => {
                let column = self.column("");
                debug_assert!(
                    column.sql.as_deref().is_none_or(|s| s == sql) && column.literal.len() == 1,
                    "a column of the same SQL in every row"
                );
                column.sql = Some(sql.to_owned());
            }
        }
        self.column += 1;
        self
    }

    /// PostgreSQL: the row's next column, made by the first row.
    fn column(&mut self, element: &'static str) -> &mut Column {
        let columns = &mut self.statement.columns;
        if columns.len() == self.column {
            columns.push(Column {
                element,
                literal: String::from("{"),
                sql: None,
            });
        }
        &mut columns[self.column]
    }
}

/// A value PostgreSQL reads as an element of an array written as text (`{1,"a\"b",NULL}`):
/// what [`Row::push_bind`] takes.
pub(crate) trait ArrayElement {
    /// The array's element type, as PostgreSQL names it.
    const ELEMENT: &'static str;
    fn write_element(&self, out: &mut String);
}

impl ArrayElement for i64 {
    const ELEMENT: &'static str = "int8";
    fn write_element(&self, out: &mut String) {
        out.push_str(itoa::Buffer::new().format(*self));
    }
}

impl ArrayElement for i32 {
    const ELEMENT: &'static str = "int4";
    fn write_element(&self, out: &mut String) {
        out.push_str(itoa::Buffer::new().format(*self));
    }
}

/// Quoted, with `"` and `\` escaped: any text stands for itself, `NULL` and the empty string
/// included.
impl ArrayElement for str {
    const ELEMENT: &'static str = "text";
    fn write_element(&self, out: &mut String) {
        out.reserve(self.len() + 2);
        out.push('"');
        for c in self.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
}

impl ArrayElement for String {
    const ELEMENT: &'static str = "text";
    fn write_element(&self, out: &mut String) {
        self.as_str().write_element(out);
    }
}

/// PostgreSQL's hex form (`\x6f6b`), its backslash escaped inside the quoted element.
impl ArrayElement for [u8] {
    const ELEMENT: &'static str = "bytea";
    fn write_element(&self, out: &mut String) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        out.reserve(self.len() * 2 + 5);
        out.push_str("\"\\\\x");
        for byte in self {
            out.push(HEX[usize::from(byte >> 4)] as char);
            out.push(HEX[usize::from(byte & 0xf)] as char);
        }
        out.push('"');
    }
}

impl ArrayElement for Vec<u8> {
    const ELEMENT: &'static str = "bytea";
    fn write_element(&self, out: &mut String) {
        self.as_slice().write_element(out);
    }
}

impl<T: ArrayElement> ArrayElement for Option<T> {
    const ELEMENT: &'static str = T::ELEMENT;
    fn write_element(&self, out: &mut String) {
        match self {
            Some(value) => value.write_element(out),
            None => out.push_str("NULL"),
        }
    }
}

impl<T: ArrayElement + ?Sized> ArrayElement for &T {
    const ELEMENT: &'static str = T::ELEMENT;
    fn write_element(&self, out: &mut String) {
        (**self).write_element(out);
    }
}

/// `values` as one array literal (`{…}`), e.g. ids for `unnest($n::int8[])`: one bound value
/// whatever their number, and a statement text that stays the same.
pub(crate) fn array_literal<T: ArrayElement>(values: &[T]) -> String {
    let mut literal = String::with_capacity(values.len() * 8 + 2);
    literal.push('{');
    for (i, value) in values.iter().enumerate() {
        if i > 0 {
            literal.push(',');
        }
        value.write_element(&mut literal);
    }
    literal.push('}');
    literal
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind of value a bulk statement carries comes back as it went in, on either
    /// dialect: text that looks like array syntax or `NULL`, every byte, no value, the extremes, an expression.
    #[tokio::test]
    async fn rows_come_back_as_they_were_bound() {
        use sqlx::Row as _;
        let (_db, store) = crate::test_store().await;
        let every_byte: Vec<u8> = (0..=255).collect();
        type Written<'a> = (
            i64,
            Option<i32>,
            &'a str,
            Option<&'a str>,
            &'a [u8],
            Option<i64>,
        );
        let rows: Vec<Written<'_>> = vec![
            (i64::MIN, Some(i32::MIN), "", None, &[], None),
            (-1, None, "NULL", Some("null"), &every_byte, Some(i64::MAX)),
            (
                0,
                Some(0),
                "a\"b\\c,d{e}f g",
                Some("\\\""),
                b"\\x00",
                Some(0),
            ),
            (
                i64::MAX,
                Some(i32::MAX),
                "héllo\n\ttab ☃",
                Some(""),
                b"\"{},",
                Some(-5),
            ),
        ];
        for count in [1, rows.len()] {
            let mut query = Statement::new(store.dialect, "WITH v AS (");
            query.push_values(&rows[..count], |row, (a, b, c, d, e, f)| {
                row.push_bind(*a)
                    .push_bind(*b)
                    .push_bind(*c)
                    .push_bind(*d)
                    .push_bind(*e)
                    .push_bind(*f)
                    .push_sql("7");
            });
            query.push(
                ") SELECT column1, column2, column3, column4, column5, column6, column7
                   FROM v ORDER BY column1",
            );
            let read = query.build().fetch_all(&store.pool).await.unwrap();
            assert_eq!(read.len(), count);
            for (row, wanted) in read.iter().zip(&rows) {
                assert_eq!(row.get::<i64, _>(0), wanted.0);
                assert_eq!(row.get::<Option<i32>, _>(1), wanted.1);
                assert_eq!(row.get::<String, _>(2), wanted.2);
                assert_eq!(row.get::<Option<String>, _>(3).as_deref(), wanted.3);
                assert_eq!(row.get::<Vec<u8>, _>(4), wanted.4);
                assert_eq!(row.get::<Option<i64>, _>(5), wanted.5);
                assert_eq!(row.get::<i32, _>(6), 7);
            }
        }
    }

    /// The literals PostgreSQL reads: each kind of value, quoted and escaped where it must be.
    #[test]
    fn array_literals_escape_what_postgres_reads_specially() {
        use array_literal as literal;
        assert_eq!(
            literal(&["a\"b\\c", "", "NULL", "x,{y} z"]),
            r#"{"a\"b\\c","","NULL","x,{y} z"}"#
        );
        assert_eq!(
            literal(&[Some(i64::MIN), None, Some(0)]),
            "{-9223372036854775808,NULL,0}"
        );
        assert_eq!(literal(&[None::<i32>, Some(-7)]), "{NULL,-7}");
        assert_eq!(
            literal::<&[u8]>(&[&[0x00, 0xff, b'\\'], &[]]),
            r#"{"\\x00ff5c","\\x"}"#
        );
        assert_eq!(literal(&[3_i64, -1]), "{3,-1}");
        assert_eq!(
            (
                <Option<&str>>::ELEMENT,
                <&[u8]>::ELEMENT,
                <Option<i32>>::ELEMENT
            ),
            ("text", "bytea", "int4")
        );
    }

    /// On PostgreSQL the statement's text does not grow with its rows.
    #[test]
    fn postgres_rows_are_one_array_per_column() {
        let texts: Vec<String> = [1, 3, 10_000]
            .into_iter()
            .map(|n| {
                let mut insert = Statement::new(Dialect::Postgres, "INSERT INTO t (a, b, c)");
                insert.push_values(0..n, |row, i: i64| {
                    row.push_bind(i).push_sql("0").push_bind(Some("x"));
                });
                assert_eq!(insert.arguments.len(), 2);
                insert.sql
            })
            .collect();
        assert_eq!(
            texts[0],
            "INSERT INTO t (a, b, c) SELECT u.column1, 0 AS column2, u.column3 \
             FROM unnest($1::int8[], $2::text[]) AS u(column1, column3)"
        );
        assert!(texts.iter().all(|t| *t == texts[0]));
    }

    #[test]
    fn the_setting_names_a_file_or_a_server() {
        assert_eq!(
            "sqlite:///var/lib/f/db".parse::<Database>().unwrap(),
            Database::Sqlite("/var/lib/f/db".into())
        );
        assert_eq!(
            "sqlite:db.sqlite".parse::<Database>().unwrap(),
            Database::Sqlite("db.sqlite".into())
        );
        assert_eq!(
            "/var/lib/f/db".parse::<Database>().unwrap(),
            Database::Sqlite("/var/lib/f/db".into())
        );
        assert_eq!(
            "postgres://u:pw@db:5432/fleet".parse::<Database>().unwrap(),
            Database::Postgres("postgres://u:pw@db:5432/fleet".into())
        );
        for bad in [
            "",
            "mysql://x/y",
            "sqlite://",
            "sqlite:///x?mode=ro",
            "postgres://a:b:c:d",
        ] {
            assert!(bad.parse::<Database>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_password_never_shows() {
        let db: Database = "postgres://fleet:s3cret@db:5432/fleet?sslmode=require"
            .parse()
            .unwrap();
        assert_eq!(
            db.to_string(),
            "postgres://fleet:***@db:5432/fleet?sslmode=require"
        );
        assert!(!format!("{db:?}").contains("s3cret"));
        let db: Database = "postgres://fleet@db/fleet".parse().unwrap();
        assert_eq!(db.to_string(), "postgres://fleet@db/fleet");
    }
}
