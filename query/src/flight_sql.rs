//! Arrow Flight SQL on port 8815: results leave as Arrow record batches,
//! with no conversion, for ADBC / JDBC Flight SQL drivers, `pyarrow` and
//! DuckDB or pandas behind them.
//!
//! Statements and prepared statements (with parameters bound by `DoPut`)
//! run through the one [`QueryEngine`]; catalogs, schemas, tables (with
//! their Arrow schemas), table types and server info answer the metadata
//! calls drivers make. A statement's handle is its SQL, so a ticket can be
//! redeemed on any connection; prepared statements live in a bounded table.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightServiceServer;
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandPreparedStatementQuery,
    CommandStatementQuery, DoPutPreparedStatementResult, ProstMessageExt, SqlInfo,
    TicketStatementQuery,
};
use arrow_flight::{
    Action, FlightData, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest,
    HandshakeResponse, IpcMessage, SchemaAsIpc, Ticket,
};
use datafusion::common::{ParamValues, ScalarValue};
use futures_util::{Stream, StreamExt, TryStreamExt};
use lumen_core::schema::{TABLES, table_schema};
use prost::Message;
use tonic::{Request, Response, Status};

/// Most bytes a prepared statement's parameters may take once decoded.
const MAX_PARAMETER_BYTES: u64 = 16 << 20;
/// Most messages one parameter `DoPut` may hold (a schema, dictionaries,
/// a batch: a handful in practice).
const MAX_PARAMETER_MESSAGES: usize = 1024;

use crate::engine::{CATALOG, QueryEngine, QueryError, Request as QueryRequest};

/// Prepared statements kept at once; the oldest is forgotten past this.
const MAX_PREPARED: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum FlightSqlError {
    #[error(transparent)]
    Listen(#[from] lumen_listen::AccessError),
    #[error("Flight SQL server: {0}")]
    Serve(String),
}

/// The Flight SQL server, bound and ready to run.
pub struct FlightSqlServer {
    listener: lumen_listen::SecureListener,
    service: FlightSql,
}

impl FlightSqlServer {
    /// Binds `addr`; every call must then satisfy `access` (a token as
    /// bearer, or as the password of the Basic handshake).
    pub async fn bind(
        addr: SocketAddr,
        engine: QueryEngine,
        access: &Arc<lumen_listen::Access>,
    ) -> Result<Self, FlightSqlError> {
        let listener = access
            .bind("Flight SQL", addr, lumen_listen::ALPN_GRPC)
            .await?;
        Ok(FlightSqlServer {
            listener,
            service: FlightSql {
                access: access.clone(),
                engine,
                prepared: Arc::default(),
                info: Arc::new(sql_info()),
            },
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        Some(self.listener.local_addr())
    }

    /// Serves until `shutdown` resolves; running queries are stopped by
    /// the engine's shutdown.
    pub fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> lumen_core::BoxFuture<'static, Result<(), FlightSqlError>> {
        self.run_until(Box::pin(shutdown))
    }

    // Not generic, so the state machine it boxes is compiled here, once
    // (see `lumen_core::BoxFuture`).
    fn run_until(
        self,
        shutdown: lumen_core::BoxFuture<'static, ()>,
    ) -> lumen_core::BoxFuture<'static, Result<(), FlightSqlError>> {
        Box::pin(self.serve(shutdown))
    }

    async fn serve(
        self,
        shutdown: lumen_core::BoxFuture<'static, ()>,
    ) -> Result<(), FlightSqlError> {
        let guard =
            lumen_listen::GrpcGuard::new(self.service.access.clone(), lumen_listen::Grant::Operate);
        tonic::transport::Server::builder()
            .layer(guard)
            .add_service(FlightServiceServer::new(self.service))
            .serve_with_incoming_shutdown(self.listener.incoming(), shutdown)
            .await
            .map_err(|e| FlightSqlError::Serve(e.to_string()))
    }
}

/// The token of an `Authorization` value: a bearer's, or Basic's password.
fn bearer_of(value: &str) -> Option<String> {
    use base64::Engine;
    let (scheme, rest) = value.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.trim().to_string());
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let (_, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some(password.to_string())
}

fn sql_info() -> SqlInfoData {
    let mut b = SqlInfoDataBuilder::new();
    b.append(SqlInfo::FlightSqlServerName, "Lumen");
    b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
    b.append(SqlInfo::FlightSqlServerArrowVersion, "59");
    b.append(SqlInfo::FlightSqlServerReadOnly, true);
    b.append(SqlInfo::FlightSqlServerSql, true);
    b.append(SqlInfo::FlightSqlServerSubstrait, false);
    b.append(SqlInfo::FlightSqlServerTransaction, 0i32);
    b.append(SqlInfo::FlightSqlServerCancel, false);
    // A fixed set of entries: building cannot fail.
    b.build().unwrap_or_else(|e| panic!("Flight SQL info: {e}"))
}

/// JDBC and ADBC write parameters as `?`; DataFusion numbers them (`$1`).
/// `?` inside quotes or comments is left alone.
fn numbered_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let (mut n, mut quote, mut chars) = (0, None::<char>, sql.chars().peekable());
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') => quote = Some(c),
            (None, '/') if chars.peek() == Some(&'*') => {
                // A block comment runs to its `*/`.
                out.push(c);
                let mut last = ' ';
                for c in chars.by_ref() {
                    out.push(c);
                    if last == '*' && c == '/' {
                        break;
                    }
                    last = c;
                }
                continue;
            }
            (None, '-') if chars.peek() == Some(&'-') => {
                // A line comment runs to the end of the line.
                out.push(c);
                for c in chars.by_ref() {
                    out.push(c);
                    if c == '\n' {
                        break;
                    }
                }
                continue;
            }
            (None, '?') => {
                n += 1;
                out.push_str(&format!("${n}"));
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    out
}

#[derive(Debug, Clone)]
struct Prepared {
    sql: String,
    params: Option<ParamValues>,
}

#[derive(Default)]
struct PreparedTable {
    next: u64,
    by_handle: HashMap<u64, Prepared>,
    order: VecDeque<u64>,
}

#[derive(Clone)]
pub struct FlightSql {
    access: Arc<lumen_listen::Access>,
    engine: QueryEngine,
    prepared: Arc<Mutex<PreparedTable>>,
    info: Arc<SqlInfoData>,
}

type DoGetStream = Pin<Box<dyn Stream<Item = Result<FlightData, Status>> + Send + 'static>>;

fn status(e: QueryError) -> Status {
    let message = e.to_string();
    match e {
        QueryError::ReadOnly(_) | QueryError::Sql(_) => Status::invalid_argument(message),
        QueryError::Timeout(_) => Status::deadline_exceeded(message),
        QueryError::Stopped(_) => Status::cancelled(message),
        QueryError::MemoryLimit(_) | QueryError::TooManyRows(_) | QueryError::TooLarge(_) => {
            Status::resource_exhausted(message)
        }
        QueryError::Busy(_) => Status::unavailable(message),
        QueryError::Internal(_) => Status::internal(message),
    }
}

fn origin<T>(request: &Request<T>) -> String {
    match request.remote_addr() {
        Some(a) => format!("flight-sql {a}"),
        None => "flight-sql".into(),
    }
}

fn schema_bytes(schema: &Schema) -> Result<bytes::Bytes, Status> {
    let IpcMessage(bytes) = SchemaAsIpc::new(schema, &IpcWriteOptions::default())
        .try_into()
        .map_err(|e: arrow::error::ArrowError| {
            Status::internal(format!("cannot encode schema: {e}"))
        })?;
    Ok(bytes)
}

/// The schema as results leave: the encoder sends dictionary columns as
/// their plain values (what every client reads), so the announced schema
/// must say so too.
fn hydrated(schema: &Schema) -> Schema {
    Schema::new_with_metadata(
        schema
            .fields()
            .iter()
            .map(|f| match f.data_type() {
                arrow::datatypes::DataType::Dictionary(_, values) => {
                    f.as_ref().clone().with_data_type(values.as_ref().clone())
                }
                _ => f.as_ref().clone(),
            })
            .collect::<Vec<_>>(),
        schema.metadata().clone(),
    )
}

/// A FlightInfo whose one endpoint is redeemed with `ticket` here.
fn info(
    schema: &Schema,
    ticket: Vec<u8>,
    descriptor: FlightDescriptor,
) -> Result<FlightInfo, Status> {
    Ok(FlightInfo::new()
        .try_with_schema(&hydrated(schema))
        .map_err(|e| Status::internal(format!("cannot encode schema: {e}")))?
        .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(ticket)))
        .with_descriptor(descriptor))
}

fn batches_stream(
    schema: SchemaRef,
    batches: Vec<arrow::record_batch::RecordBatch>,
) -> DoGetStream {
    let stream = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(futures_util::stream::iter(batches.into_iter().map(Ok)))
        .map_err(Status::from);
    Box::pin(stream)
}

fn one_batch(
    batch: Result<arrow::record_batch::RecordBatch, FlightError>,
) -> Result<DoGetStream, Status> {
    let batch = batch.map_err(|e| Status::internal(e.to_string()))?;
    Ok(batches_stream(batch.schema(), vec![batch]))
}

impl FlightSql {
    async fn run(&self, request: QueryRequest, origin: &str) -> Result<DoGetStream, Status> {
        let result = self
            .engine
            .execute_request(request, origin)
            .await
            .map_err(status)?;
        Ok(batches_stream(
            result.schema.clone(),
            result.batches.clone(),
        ))
    }

    fn prepared(&self, handle: &[u8]) -> Result<(u64, Prepared), Status> {
        let id: u64 = std::str::from_utf8(handle)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Status::invalid_argument("not a prepared statement handle"))?;
        let table = self.prepared.lock().unwrap_or_else(|e| e.into_inner());
        table.by_handle.get(&id).cloned().map(|p| (id, p)).ok_or_else(|| {
            Status::not_found(format!(
                "prepared statement {id} is unknown (closed, or forgotten after {MAX_PREPARED} newer ones)"
            ))
        })
    }
}

#[tonic::async_trait]
impl FlightSqlService for FlightSql {
    type FlightService = FlightSql;

    /// Flight's Basic handshake (ADBC's `username` / `password`): the
    /// guard has checked the credentials before this runs; the answer
    /// carries the token as the bearer the client sends from then on.
    async fn do_handshake(
        &self,
        request: Request<tonic::Streaming<HandshakeRequest>>,
    ) -> Result<
        Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>>,
        Status,
    > {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_of);
        let answer = HandshakeResponse {
            protocol_version: 0,
            payload: Default::default(),
        };
        let mut response: Response<
            Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>,
        > = Response::new(Box::pin(futures_util::stream::iter([Ok(answer)])));
        if let Some(token) = token
            && self.access.user_of(&token).is_some()
            && let Ok(value) = format!("Bearer {token}").parse()
        {
            response.metadata_mut().insert("authorization", value);
        }
        Ok(response)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let described = self
            .engine
            .describe(&query.query, false)
            .await
            .map_err(status)?;
        let ticket = TicketStatementQuery {
            statement_handle: query.query.into_bytes().into(),
        };
        Ok(Response::new(info(
            &described.schema,
            ticket.as_any().encode_to_vec(),
            request.into_inner(),
        )?))
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let sql = String::from_utf8(ticket.statement_handle.to_vec())
            .map_err(|_| Status::invalid_argument("statement handle is not UTF-8 SQL"))?;
        Ok(Response::new(
            self.run(QueryRequest::sql(sql), &origin(&request)).await?,
        ))
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        _request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let sql = numbered_placeholders(&query.query);
        let described = self.engine.describe(&sql, false).await.map_err(status)?;
        let params = Schema::new(
            described
                .params
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    Field::new(
                        format!("${}", i + 1),
                        t.clone().unwrap_or(arrow::datatypes::DataType::Utf8),
                        true,
                    )
                })
                .collect::<Vec<_>>(),
        );
        let id = {
            let mut table = self.prepared.lock().unwrap_or_else(|e| e.into_inner());
            table.next += 1;
            let id = table.next;
            table.by_handle.insert(id, Prepared { sql, params: None });
            table.order.push_back(id);
            while table.order.len() > MAX_PREPARED {
                if let Some(old) = table.order.pop_front() {
                    table.by_handle.remove(&old);
                }
            }
            id
        };
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: id.to_string().into_bytes().into(),
            dataset_schema: schema_bytes(&hydrated(&described.schema))?,
            parameter_schema: if params.fields().is_empty() {
                Default::default()
            } else {
                schema_bytes(&params)?
            },
        })
    }

    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        let (id, _) = self.prepared(&query.prepared_statement_handle)?;
        // The messages are read whole first, held to a size both as sent
        // and as their compressed buffers declare once decompressed (those
        // are allocated before they are read: a few bytes could ask for a
        // terabyte); then decoded as the collector decodes a DoPut.
        let mut stream = request.into_inner();
        let (mut sent, mut declared) = (0u64, 0u64);
        let mut messages = Vec::new();
        while let Some(m) = stream.next().await {
            let m = m?;
            lumen_core::ipc::check_buffers(&m.data_header, &m.data_body)
                .map_err(|e| Status::invalid_argument(format!("parameters: {e}")))?;
            sent = sent.saturating_add(prost::Message::encoded_len(&m) as u64);
            declared = declared.saturating_add(lumen_core::ipc::declared_decompressed_size(
                &m.data_header,
                &m.data_body,
            ));
            if sent.max(declared) > MAX_PARAMETER_BYTES || messages.len() >= MAX_PARAMETER_MESSAGES
            {
                return Err(Status::invalid_argument(format!(
                    "parameters over the limit of {MAX_PARAMETER_BYTES} bytes and {MAX_PARAMETER_MESSAGES} messages (sent {sent} bytes, {declared} once decompressed, {} messages)",
                    messages.len() + 1
                )));
            }
            messages.push(m);
        }
        let batches = lumen_collector::ingest::flight::decode(messages, "the parameters")?;
        // One row of values: the parameters of the next execution.
        let row = batches.iter().find(|b| b.num_rows() > 0);
        let values = match row {
            Some(b) => b
                .columns()
                .iter()
                .map(|c| ScalarValue::try_from_array(c, 0))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Status::invalid_argument(format!("bad parameter value: {e}")))?,
            None => Vec::new(),
        };
        let mut table = self.prepared.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = table.by_handle.get_mut(&id) {
            p.params = Some(ParamValues::from(values));
        }
        Ok(DoPutPreparedStatementResult {
            prepared_statement_handle: Some(query.prepared_statement_handle),
        })
    }

    async fn get_flight_info_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let (_, prepared) = self.prepared(&query.prepared_statement_handle)?;
        let described = self
            .engine
            .describe(&prepared.sql, false)
            .await
            .map_err(status)?;
        Ok(Response::new(info(
            &described.schema,
            query.as_any().encode_to_vec(),
            request.into_inner(),
        )?))
    }

    async fn do_get_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let (_, prepared) = self.prepared(&query.prepared_statement_handle)?;
        let request_origin = origin(&request);
        Ok(Response::new(
            self.run(
                QueryRequest {
                    sql: prepared.sql,
                    postgres: false,
                    params: prepared.params,
                },
                &request_origin,
            )
            .await?,
        ))
    }

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        _request: Request<Action>,
    ) -> Result<(), Status> {
        if let Ok((id, _)) = self.prepared(&query.prepared_statement_handle) {
            let mut table = self.prepared.lock().unwrap_or_else(|e| e.into_inner());
            table.by_handle.remove(&id);
            table.order.retain(|x| *x != id);
        }
        Ok(())
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        Ok(Response::new(info(
            &schema,
            query.as_any().encode_to_vec(),
            request.into_inner(),
        )?))
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let mut b = query.into_builder();
        b.append(CATALOG);
        Ok(Response::new(one_batch(b.build())?))
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        Ok(Response::new(info(
            &schema,
            query.as_any().encode_to_vec(),
            request.into_inner(),
        )?))
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let mut b = query.into_builder();
        b.append(CATALOG, "public");
        Ok(Response::new(one_batch(b.build())?))
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        Ok(Response::new(info(
            &schema,
            query.as_any().encode_to_vec(),
            request.into_inner(),
        )?))
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let mut b = query.into_builder();
        for name in TABLES {
            let schema = table_schema(name).unwrap_or_else(|| Arc::new(Schema::empty()));
            b.append(CATALOG, "public", name, "TABLE", &schema)
                .map_err(|e| Status::internal(e.to_string()))?;
        }
        Ok(Response::new(one_batch(b.build())?))
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        Ok(Response::new(info(
            &schema,
            query.as_any().encode_to_vec(),
            request.into_inner(),
        )?))
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let mut b = query.into_builder();
        b.append("TABLE");
        Ok(Response::new(one_batch(b.build())?))
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder(&self.info).schema();
        Ok(Response::new(info(
            &schema,
            query.as_any().encode_to_vec(),
            request.into_inner(),
        )?))
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        Ok(Response::new(one_batch(
            query.into_builder(&self.info).build(),
        )?))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

#[cfg(test)]
mod tests {
    use super::numbered_placeholders;

    #[test]
    fn question_marks_become_numbered_parameters() {
        assert_eq!(
            numbered_placeholders("SELECT * FROM t WHERE a = ? AND b = '?' AND c = ? -- ?\n"),
            "SELECT * FROM t WHERE a = $1 AND b = '?' AND c = $2 -- ?\n"
        );
        assert_eq!(
            numbered_placeholders("SELECT /* ? */ x FROM t WHERE y = ?"),
            "SELECT /* ? */ x FROM t WHERE y = $1"
        );
    }
}
