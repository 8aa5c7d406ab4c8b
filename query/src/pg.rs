//! The Postgres wire protocol (port 5433), so `psql`, Grafana's PostgreSQL
//! data source and any Postgres driver read Lumen's tables.
//!
//! `pgwire` speaks the protocol (simple and extended queries); statements
//! are rewritten for DataFusion by `datafusion-pg-catalog`, whose
//! `pg_catalog` answers the catalog queries clients send (`\dt`, `\d`,
//! `\l`); `arrow-pg` turns Arrow rows into Postgres rows. Every query runs
//! through the one [`QueryEngine`], with its limits. Session statements
//! (`SET` of harmless settings, `SHOW`, transactions) are answered here.
//! Errors go back with their SQLSTATE, and the session continues.

use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use arrow::datatypes::DataType;
use arrow_pg::datatypes::{arrow_schema_to_pg_fields, encode_recordbatch, into_pg_type};
use async_trait::async_trait;
use datafusion_pg_catalog::sql::PostgresCompatibilityParser;
use futures::Sink;
use futures::stream;
use pgwire::api::auth::sasl::SASLAuthStartupHandler;
use pgwire::api::auth::sasl::scram::{ScramAuth, gen_salted_password, random_nonce};
use pgwire::api::auth::{
    AuthSource, LoginInfo, Password, ServerParameterProvider, StartupHandler,
    finish_authentication, protocol_negotiation, save_startup_parameters_to_metadata,
};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{DataRowEncoder, FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::PortalStore;
use pgwire::api::{
    ClientInfo, ClientPortalStore, PgWireServerHandlers, PidSecretKeyGenerator,
    RandomPidSecretKeyGenerator, Type,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use pgwire::types::format::FormatOptions;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::engine::{Busy, Described, QueryEngine, QueryError, Request};
use crate::guard::StopReason;

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("cannot listen on {addr} (Postgres wire): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "Postgres wire on {addr} would be reachable from other machines {missing}: give \
         --tls-cert-file and --tls-key-file, and --token-file or --pg-password (or \
         LUMEN_PG_PASSWORD), or listen on 127.0.0.1"
    )]
    Exposed {
        addr: SocketAddr,
        missing: &'static str,
    },
}

/// The Postgres wire server, bound and ready to run.
pub struct PgServer {
    listener: TcpListener,
    /// Offered to clients that ask (`sslmode=require`); once set, clients
    /// that do not are refused.
    tls: Option<pgwire::tokio::TlsAcceptor>,
    handlers: Arc<Handlers>,
}

impl PgServer {
    /// Binds `addr`. Passwords are checked with SCRAM-SHA-256: a user of
    /// `access`'s token file gives their token, anyone else `password`.
    /// Beyond loopback a password or token file and TLS are required:
    /// anyone who can connect could otherwise read every request.
    pub async fn bind(
        addr: SocketAddr,
        engine: QueryEngine,
        password: Option<String>,
        access: &Arc<lumen_listen::Access>,
    ) -> Result<Self, PgError> {
        let password = password.filter(|p| !p.is_empty());
        let credentials = password.is_some() || access.requires_credentials();
        if !addr.ip().is_loopback() {
            let missing = match (access.tls(), credentials) {
                (true, true) => None,
                (false, false) => Some("in cleartext and without a password"),
                (false, true) => Some("in cleartext"),
                (true, false) => Some("without a password"),
            };
            if let Some(missing) = missing {
                return Err(PgError::Exposed { addr, missing });
            }
        }
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| PgError::Bind { addr, source })?;
        let session = Arc::new(Session {
            parser: Arc::new(Parser {
                sql: PostgresCompatibilityParser::new(),
                engine: engine.clone(),
            }),
            engine,
        });
        let secrets = credentials.then(|| {
            Arc::new(Secrets {
                password: password.map(Arc::from),
                access: access.clone(),
            })
        });
        Ok(PgServer {
            listener,
            tls: access.acceptor(&[b"postgresql"]),
            handlers: Arc::new(Handlers { session, secrets }),
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `shutdown` resolves, then gives open sessions
    /// [`crate::DRAIN_TIMEOUT`] to end (their queries are stopped by the
    /// engine's shutdown) and closes the rest.
    pub fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> lumen_core::BoxFuture<'static, std::io::Result<()>> {
        self.run_until(Box::pin(shutdown))
    }

    // Not generic, so the state machine it boxes is compiled here, once
    // (see `lumen_core::BoxFuture`).
    fn run_until(
        self,
        shutdown: lumen_core::BoxFuture<'static, ()>,
    ) -> lumen_core::BoxFuture<'static, std::io::Result<()>> {
        Box::pin(self.serve(shutdown))
    }

    async fn serve(self, shutdown: lumen_core::BoxFuture<'static, ()>) -> std::io::Result<()> {
        let mut sessions = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((socket, peer)) => {
                        let _ = socket.set_nodelay(true);
                        let handlers = self.handlers.clone();
                        let tls = self.tls.clone();
                        sessions.spawn(async move {
                            if let Err(e) = pgwire::tokio::process_socket(socket, tls, handlers).await {
                                tracing::debug!(%peer, error = %e, "postgres session ended with an error");
                            }
                        });
                    }
                    Err(e) => {
                        // Out of descriptors, most likely: wait rather than spin.
                        tracing::warn!(error = %e, "postgres wire: cannot accept");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                },
                Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            }
        }
        let drained = tokio::time::timeout(crate::DRAIN_TIMEOUT, async {
            while sessions.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::info!(
                sessions = sessions.len(),
                "closing idle Postgres sessions at shutdown"
            );
            sessions.abort_all();
        }
        Ok(())
    }
}

struct Handlers {
    session: Arc<Session>,
    /// Where passwords come from; none: anyone on loopback.
    secrets: Option<Arc<Secrets>>,
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.session.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.session.clone()
    }

    // Called once per connection: the SCRAM exchange keeps its state in
    // the handler.
    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        Arc::new(Startup {
            tls_required: self.secrets.as_ref().is_some_and(|s| s.access.tls()),
            scram: self.secrets.clone().map(|secrets| {
                let mut scram = ScramAuth::new(secrets);
                scram.set_iterations(SCRAM_ITERATIONS);
                SASLAuthStartupHandler::new(Arc::new(Parameters)).with_scram(scram)
            }),
        })
    }
}

/// The server version clients see: Postgres 15's catalog and syntax are
/// what `datafusion-pg-catalog` follows; the suffix says who answers.
const SERVER_VERSION: &str = "15.0 (Lumen)";

/// Session settings as a fresh session has them; `SET` changes the
/// harmless ones per session, `SHOW` reads them.
const SETTINGS: [(&str, &str); 15] = [
    ("application_name", ""),
    ("client_encoding", "UTF8"),
    ("client_min_messages", "notice"),
    ("datestyle", "ISO, MDY"),
    ("default_transaction_read_only", "on"),
    ("extra_float_digits", "1"),
    ("integer_datetimes", "on"),
    ("intervalstyle", "postgres"),
    ("max_identifier_length", "63"),
    ("search_path", "public"),
    ("server_encoding", "UTF8"),
    ("server_version", SERVER_VERSION),
    ("standard_conforming_strings", "on"),
    ("timezone", "UTC"),
    ("transaction_isolation", "read committed"),
];

/// Settings a client may change: they only affect how it is answered,
/// and Lumen answers the same way whatever they say.
const SETTABLE: [&str; 14] = [
    "application_name",
    "bytea_output",
    "client_encoding",
    "client_min_messages",
    "datestyle",
    "extra_float_digits",
    "idle_in_transaction_session_timeout",
    "intervalstyle",
    "lock_timeout",
    "search_path",
    "statement_timeout",
    "timezone",
    "time zone",
    "session characteristics",
];

struct Parameters;

impl ServerParameterProvider for Parameters {
    fn server_parameters<C>(&self, _client: &C) -> Option<HashMap<String, String>>
    where
        C: ClientInfo,
    {
        let reported = [
            ("server_version", SERVER_VERSION),
            ("server_encoding", "UTF8"),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO, MDY"),
            ("IntervalStyle", "postgres"),
            ("TimeZone", "UTC"),
            ("integer_datetimes", "on"),
            ("standard_conforming_strings", "on"),
            ("is_superuser", "off"),
            ("default_transaction_read_only", "on"),
            ("in_hot_standby", "off"),
        ];
        Some(
            reported
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }
}

/// SCRAM's PBKDF2 rounds: the RFC's minimum, as Postgres uses.
const SCRAM_ITERATIONS: usize = 4096;

/// Passwords for SCRAM: a token file user's token, or the one password
/// for any other name.
#[derive(Debug)]
struct Secrets {
    password: Option<Arc<str>>,
    access: Arc<lumen_listen::Access>,
}

#[async_trait]
impl AuthSource for Secrets {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        let user = login.user().unwrap_or_default();
        // A name nobody has still gets a challenge (for a secret no one
        // knows): failing earlier would tell which names exist.
        let secret = self
            .access
            .token_of(user)
            .or_else(|| self.password.as_deref().map(str::to_string))
            .unwrap_or_else(random_nonce);
        let salt = random_nonce().into_bytes();
        let salted = gen_salted_password(&secret, &salt, SCRAM_ITERATIONS);
        Ok(Password::new(Some(salt), salted))
    }
}

/// No authentication on loopback without credentials; SCRAM-SHA-256
/// otherwise, over TLS once TLS is configured.
struct Startup {
    tls_required: bool,
    scram: Option<SASLAuthStartupHandler<Parameters>>,
}

#[async_trait]
impl StartupHandler for Startup {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        if matches!(message, PgWireFrontendMessage::Startup(_))
            && self.tls_required
            && !client.is_secure()
        {
            return Err(PgWireError::UserError(Box::new(ErrorInfo::new(
                "FATAL".to_string(),
                "28000".to_string(),
                "this server requires TLS: connect with sslmode=require".to_string(),
            ))));
        }
        if let Some(scram) = &self.scram {
            return scram.on_startup(client, message).await;
        }
        if let PgWireFrontendMessage::Startup(ref startup) = message {
            protocol_negotiation(client, startup).await?;
            save_startup_parameters_to_metadata(client, startup);
            let (pid, key) = RandomPidSecretKeyGenerator::default().generate(client);
            client.set_pid_and_secret_key(pid, key);
            finish_authentication(client, &Parameters).await?;
        }
        Ok(())
    }
}

/// What a statement is, for how it is answered.
#[derive(Debug, Clone)]
enum Kind {
    Query(Described),
    /// `SET name = value`.
    Set(String, String),
    Show(String),
    /// `BEGIN`, `COMMIT`, …: reads need no transaction; the tag is echoed.
    Transaction(&'static str),
    /// `DISCARD`, `DEALLOCATE`, `RESET`, `CLOSE`: nothing to do.
    Accepted(String),
}

#[derive(Debug, Clone)]
pub struct Prepared {
    sql: String,
    kind: Kind,
}

struct Parser {
    sql: PostgresCompatibilityParser,
    engine: QueryEngine,
}

impl Parser {
    /// Splits and rewrites `input` for DataFusion (Postgres's casts,
    /// operators and catalog names).
    fn statements(&self, input: &str) -> PgWireResult<Vec<String>> {
        let statements = self
            .sql
            .parse(input)
            .map_err(|e| user_error("42601", format!("syntax error: {e}")))?;
        Ok(statements.into_iter().map(|s| s.to_string()).collect())
    }
}

/// A statement's session kind, from its leading words.
fn session_kind(sql: &str) -> PgWireResult<Option<Kind>> {
    let trimmed = sql.trim().trim_end_matches(';').trim();
    let lower = trimmed.to_ascii_lowercase();
    let words: Vec<&str> = lower.split_whitespace().collect();
    let kind = match words.as_slice() {
        ["begin", ..] | ["start", "transaction", ..] => Kind::Transaction("BEGIN"),
        ["commit", ..] | ["end", ..] => Kind::Transaction("COMMIT"),
        ["rollback", ..] | ["abort", ..] => Kind::Transaction("ROLLBACK"),
        ["discard", ..] => Kind::Accepted("DISCARD ALL".into()),
        ["deallocate", ..] => Kind::Accepted("DEALLOCATE".into()),
        ["reset", ..] => Kind::Accepted("RESET".into()),
        ["show", rest @ ..] if !rest.is_empty() => Kind::Show(rest.join(" ")),
        ["set", ..] => {
            let (name, value) = parse_set(trimmed)?;
            Kind::Set(name, value)
        }
        _ => return Ok(None),
    };
    Ok(Some(kind))
}

/// `SET [SESSION|LOCAL] name {=|TO} value` → (name, value).
fn parse_set(sql: &str) -> PgWireResult<(String, String)> {
    let rest = sql[3..].trim();
    let rest = ["session ", "local "]
        .iter()
        .find_map(|p| {
            rest.get(..p.len())
                .filter(|h| h.eq_ignore_ascii_case(p))
                .map(|_| rest[p.len()..].trim())
        })
        .unwrap_or(rest);
    let lower = rest.to_ascii_lowercase();
    for multi in ["time zone", "session characteristics"] {
        if lower.starts_with(multi) {
            return check_settable(multi, rest[multi.len()..].trim());
        }
    }
    let (name, value) = match rest.find(|c: char| c == '=' || c.is_whitespace()) {
        Some(i) => (&rest[..i], rest[i..].trim_start()),
        None => (rest, ""),
    };
    let value = value
        .strip_prefix('=')
        .or_else(|| {
            value
                .get(..3)
                .filter(|h| h.eq_ignore_ascii_case("to "))
                .map(|_| &value[3..])
        })
        .unwrap_or(value)
        .trim();
    check_settable(&name.to_ascii_lowercase(), value)
}

fn check_settable(name: &str, value: &str) -> PgWireResult<(String, String)> {
    let name = name.trim_matches('"').to_string();
    if !SETTABLE.contains(&name.as_str()) {
        return Err(user_error(
            "42704",
            format!(
                "unrecognized or unchangeable configuration parameter \"{name}\": Lumen is read-only and accepts SET of {}",
                SETTABLE.join(", ")
            ),
        ));
    }
    let value = value.trim().trim_matches('\'').to_string();
    Ok((
        if name == "time zone" {
            "timezone".into()
        } else {
            name
        },
        value,
    ))
}

fn user_error(code: &str, message: String) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".to_string(),
        code.to_string(),
        message,
    )))
}

/// A query's failure as Postgres reports it, with its SQLSTATE.
fn query_error(e: QueryError) -> PgWireError {
    let code = match &e {
        QueryError::ReadOnly(_) => "25006",
        QueryError::Sql(m) => sql_state(m),
        QueryError::Timeout(_) | QueryError::Stopped(StopReason::Timeout) => "57014",
        QueryError::Stopped(StopReason::Cancelled | StopReason::ClientGone) => "57014",
        QueryError::Stopped(StopReason::Shutdown) => "57P01",
        QueryError::MemoryLimit(_) => "53200",
        QueryError::TooManyRows(_) | QueryError::TooLarge(_) => "54000",
        QueryError::Busy(Busy::QueueFull { .. } | Busy::QueueTimeout(_)) => "53300",
        QueryError::Internal(_) => "XX000",
    };
    user_error(code, e.to_string())
}

/// SQLSTATE of a DataFusion planning or execution error, from its text.
fn sql_state(message: &str) -> &'static str {
    let m = message.to_ascii_lowercase();
    if m.contains("sql parser error") || m.contains("parsererror") {
        "42601"
    } else if m.contains("table '") && m.contains("not found") || m.contains("table not found") {
        "42P01"
    } else if m.contains("no field named") || m.contains("schema error") {
        "42703"
    } else if m.contains("invalid function") || m.contains("no function matches") {
        "42883"
    } else if m.contains("divide by zero") {
        "22012"
    } else if m.contains("cast") {
        "22P02"
    } else {
        "42000"
    }
}

struct Session {
    engine: QueryEngine,
    parser: Arc<Parser>,
}

impl Session {
    fn origin<C: ClientInfo>(client: &C) -> String {
        format!("postgres {}", client.socket_addr())
    }

    async fn answer<C: ClientInfo>(
        &self,
        client: &mut C,
        sql: &str,
        kind: Option<Kind>,
        params: Option<datafusion::common::ParamValues>,
        format: &Format,
    ) -> PgWireResult<Response> {
        match kind {
            Some(Kind::Transaction(tag)) => Ok(match tag {
                "BEGIN" => Response::TransactionStart(Tag::new(tag)),
                _ => Response::TransactionEnd(Tag::new(tag)),
            }),
            Some(Kind::Accepted(tag)) => Ok(Response::Execution(Tag::new(&tag))),
            Some(Kind::Set(name, value)) => {
                client
                    .metadata_mut()
                    .insert(format!("lumen.set.{name}"), value);
                Ok(Response::Execution(Tag::new("SET")))
            }
            Some(Kind::Show(name)) => show(client, &name, format),
            Some(Kind::Query(_)) | None => {
                let result = self
                    .engine
                    .execute_request(
                        Request {
                            sql: sql.to_string(),
                            postgres: true,
                            params,
                        },
                        &Self::origin(client),
                    )
                    .await
                    .map_err(query_error)?;
                let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
                let fields = Arc::new(arrow_schema_to_pg_fields(
                    &text_columns_schema(&result.schema),
                    format,
                    Some(options),
                )?);
                let batches = result
                    .batches
                    .iter()
                    .map(text_columns)
                    .collect::<PgWireResult<Vec<_>>>()?;
                // arrow-pg's row encoder repeats an encoding error forever
                // (it does not move past the failing row): the first error
                // ends the answer, as an error to the client.
                let mut rows: Vec<PgWireResult<_>> = Vec::new();
                'batches: for b in batches {
                    for row in encode_recordbatch(fields.clone(), b) {
                        let failed = row.is_err();
                        rows.push(row);
                        if failed {
                            break 'batches;
                        }
                    }
                }
                Ok(Response::Query(QueryResponse::new(
                    fields,
                    stream::iter(rows),
                )))
            }
        }
    }
}

fn show<C: ClientInfo>(client: &C, name: &str, format: &Format) -> PgWireResult<Response> {
    let key = name.trim().trim_matches('"').to_ascii_lowercase();
    let key = if key == "time zone" {
        "timezone".to_string()
    } else {
        key
    };
    let value = client
        .metadata()
        .get(&format!("lumen.set.{key}"))
        .cloned()
        .or_else(|| {
            SETTINGS
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.to_string())
        })
        .ok_or_else(|| {
            user_error(
                "42704",
                format!("unrecognized configuration parameter \"{key}\""),
            )
        })?;
    let field = show_field(&key, format);
    let fields = Arc::new(vec![field]);
    let mut encoder = DataRowEncoder::new(fields.clone());
    encoder.encode_field(&Some(value))?;
    let row = encoder.take_row();
    Ok(Response::Query(QueryResponse::new(
        fields,
        stream::iter(vec![Ok(row)]),
    )))
}

fn show_field(name: &str, format: &Format) -> FieldInfo {
    FieldInfo::new(
        name.to_string(),
        None,
        None,
        Type::TEXT,
        format.format_for(0),
    )
}

#[async_trait]
impl SimpleQueryHandler for Session {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let statements = self.parser.statements(query)?;
        if statements.is_empty() {
            return Ok(vec![Response::EmptyQuery]);
        }
        let mut responses = Vec::with_capacity(statements.len());
        for sql in statements {
            let kind = session_kind(&sql)?;
            responses.push(
                self.answer(client, &sql, kind, None, &Format::UnifiedText)
                    .await?,
            );
        }
        Ok(responses)
    }
}

#[async_trait]
impl QueryParser for Parser {
    type Statement = Prepared;

    async fn parse_sql<C>(
        &self,
        _client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<Self::Statement>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let mut statements = self.statements(sql)?;
        if statements.is_empty() {
            return Ok(None);
        }
        let sql = statements.remove(0);
        let kind = match session_kind(&sql)? {
            Some(k) => k,
            // Describe must name the result's columns before it runs.
            None => Kind::Query(
                self.engine
                    .describe(&sql, true)
                    .await
                    .map_err(query_error)?,
            ),
        };
        Ok(Some(Prepared { sql, kind }))
    }

    fn get_parameter_types(&self, stmt: &Self::Statement) -> PgWireResult<Vec<Type>> {
        match &stmt.kind {
            Kind::Query(d) => d
                .params
                .iter()
                .map(|t| match t {
                    Some(t) => into_pg_type(t),
                    None => Ok(Type::UNKNOWN),
                })
                .collect(),
            _ => Ok(Vec::new()),
        }
    }

    fn get_result_schema(
        &self,
        stmt: &Self::Statement,
        column_format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        let format = column_format.unwrap_or(&Format::UnifiedText);
        match &stmt.kind {
            Kind::Query(d) => {
                arrow_schema_to_pg_fields(&text_columns_schema(&d.schema), format, None)
            }
            Kind::Show(name) => Ok(vec![show_field(name, format)]),
            _ => Ok(Vec::new()),
        }
    }
}

/// Columns Postgres clients get as text: maps (`attributes`; Postgres has
/// no map type, arrow-pg no encoding for one) as JSON object text, as
/// `jsonb` would print; fixed-size binary ids (`trace_id`, `span_id`,
/// which arrow-pg cannot encode) as lowercase hex, as the HTTP API and
/// Jaeger show them.
fn as_text(t: &DataType) -> bool {
    matches!(t, DataType::Map(..) | DataType::FixedSizeBinary(_))
}

fn text_columns_schema(schema: &arrow::datatypes::Schema) -> arrow::datatypes::Schema {
    let fields: Vec<arrow::datatypes::Field> = schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            t if as_text(t) => f.as_ref().clone().with_data_type(DataType::Utf8),
            _ => f.as_ref().clone(),
        })
        .collect();
    arrow::datatypes::Schema::new_with_metadata(fields, schema.metadata().clone())
}

fn text_columns(
    batch: &arrow::record_batch::RecordBatch,
) -> PgWireResult<arrow::record_batch::RecordBatch> {
    use arrow::array::{Array, ArrayRef, AsArray, StringBuilder};
    if !batch
        .schema()
        .fields()
        .iter()
        .any(|f| as_text(f.data_type()))
    {
        return Ok(batch.clone());
    }
    let internal = |e: arrow::error::ArrowError| {
        PgWireError::UserError(Box::new(ErrorInfo::new(
            "ERROR".into(),
            "XX000".into(),
            format!("cannot show a column as text: {e}"),
        )))
    };
    let columns = batch
        .columns()
        .iter()
        .map(|c| -> PgWireResult<ArrayRef> {
            if let Some(ids) = c.as_fixed_size_binary_opt() {
                let mut out = StringBuilder::new();
                for row in 0..ids.len() {
                    if ids.is_null(row) {
                        out.append_null();
                    } else {
                        use std::fmt::Write as _;
                        let mut hex = String::with_capacity(ids.value_length() as usize * 2);
                        for b in ids.value(row) {
                            let _ = write!(hex, "{b:02x}");
                        }
                        out.append_value(hex);
                    }
                }
                return Ok(Arc::new(out.finish()));
            }
            let Some(map) = c.as_map_opt() else {
                return Ok(c.clone());
            };
            let keys = arrow::compute::cast(map.keys(), &DataType::Utf8).map_err(internal)?;
            let values = arrow::compute::cast(map.values(), &DataType::Utf8).map_err(internal)?;
            let (keys, values) = (keys.as_string::<i32>(), values.as_string::<i32>());
            let offsets = map.value_offsets();
            let mut out = StringBuilder::new();
            for row in 0..map.len() {
                if map.is_null(row) {
                    out.append_null();
                    continue;
                }
                let entries: serde_json::Map<String, serde_json::Value> = (offsets[row] as usize
                    ..offsets[row + 1] as usize)
                    .map(|i| {
                        let v = if values.is_null(i) {
                            serde_json::Value::Null
                        } else {
                            serde_json::Value::String(values.value(i).to_owned())
                        };
                        (keys.value(i).to_owned(), v)
                    })
                    .collect();
                out.append_value(serde_json::Value::Object(entries).to_string());
            }
            Ok(Arc::new(out.finish()))
        })
        .collect::<PgWireResult<Vec<_>>>()?;
    arrow::record_batch::RecordBatch::try_new(
        Arc::new(text_columns_schema(&batch.schema())),
        columns,
    )
    .map_err(internal)
}

#[async_trait]
impl ExtendedQueryHandler for Session {
    type Statement = Prepared;
    type QueryParser = Parser;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        self.parser.clone()
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Self::Statement>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let prepared = &portal.statement.statement;
        let params = match &prepared.kind {
            Kind::Query(described) if portal.parameter_len() > 0 => {
                let types: Vec<Option<&DataType>> =
                    described.params.iter().map(Option::as_ref).collect();
                Some(arrow_pg::datatypes::df::deserialize_parameters(
                    portal, &types,
                )?)
            }
            _ => None,
        };
        let kind = match &prepared.kind {
            Kind::Query(_) => None,
            other => Some(other.clone()),
        };
        self.answer(
            client,
            &prepared.sql,
            kind,
            params,
            &portal.result_column_format,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_statements_are_read() {
        let (n, v) = parse_set("SET DateStyle = 'ISO'").unwrap();
        assert_eq!((n.as_str(), v.as_str()), ("datestyle", "ISO"));
        let (n, v) = parse_set("SET SESSION statement_timeout TO 5000").unwrap();
        assert_eq!((n.as_str(), v.as_str()), ("statement_timeout", "5000"));
        let (n, v) = parse_set("set time zone 'UTC'").unwrap();
        assert_eq!((n.as_str(), v.as_str()), ("timezone", "UTC"));
        assert!(parse_set("SET work_mem = '1GB'").is_err());
    }

    #[test]
    fn session_statements_are_told_from_queries() {
        assert!(matches!(
            session_kind("BEGIN").unwrap(),
            Some(Kind::Transaction("BEGIN"))
        ));
        assert!(matches!(
            session_kind("SHOW search_path").unwrap(),
            Some(Kind::Show(n)) if n == "search_path"
        ));
        assert!(session_kind("SELECT 1").unwrap().is_none());
    }
}
