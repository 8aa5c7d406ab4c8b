//! `requests` rows as OTLP spans — how a record leaves Lumen for any
//! OpenTelemetry backend (Jaeger, Tempo, another collector): a proxy
//! exporting OTLP, and the collector fanning records out.

use arrow::array::{
    Array, AsArray, BooleanArray, DictionaryArray, FixedSizeBinaryArray, Int32Array, Int64Array,
    StringArray,
};
use arrow::datatypes::{Int32Type, TimestampMicrosecondType};
use arrow::record_batch::RecordBatch;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, span, status,
};

use bytes::{Buf, BufMut, Bytes};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use crate::schema::attr;

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

/// Proxies' records as spans of `resource`, in the scope by which the
/// collector tells them from apps' spans ([`crate::schema::PROXY_SCOPE`]).
pub fn proxy_resource_spans(resource: Resource, spans: Vec<Span>) -> ResourceSpans {
    ResourceSpans {
        resource: Some(resource),
        scope_spans: vec![ScopeSpans {
            scope: Some(InstrumentationScope {
                name: crate::schema::PROXY_SCOPE.into(),
                version: env!("CARGO_PKG_VERSION").into(),
                ..Default::default()
            }),
            spans,
            schema_url: String::new(),
        }],
        schema_url: String::new(),
    }
}

/// Every row of a `requests` batch as a span (client span for the
/// source's record, server span for the destination's), with the record's
/// fields as the attributes Lumen's collector reads back.
pub fn request_spans(batch: &RecordBatch) -> Result<Vec<Span>, String> {
    let c = Columns::of(batch)?;
    Ok((0..batch.num_rows()).map(|i| c.span(i)).collect())
}

/// The service that reported each row: the source's for client records,
/// the destination's for server records (a resource's `service.name`).
pub fn reporting_services(batch: &RecordBatch) -> Result<Vec<String>, String> {
    let c = Columns::of(batch)?;
    let source = c.position(attr::SOURCE_SERVICE);
    Ok((0..batch.num_rows())
        .map(|i| {
            let which = if c.name(c.reporter, i) == "source" {
                source
            } else {
                c.destination_service
            };
            c.name(which, i).to_owned()
        })
        .collect())
}

/// Typed views of a `requests` batch's columns.
struct Columns<'a> {
    time: &'a arrow::array::PrimitiveArray<TimestampMicrosecondType>,
    duration_us: &'a Int64Array,
    names: Vec<(
        &'static str,
        &'a DictionaryArray<Int32Type>,
        &'a StringArray,
    )>,
    method: usize,
    destination_service: usize,
    reporter: usize,
    status: &'a Int32Array,
    grpc_status: &'a Int32Array,
    ints: Vec<(&'static str, &'a dyn Array)>,
    upstream: (&'a DictionaryArray<Int32Type>, &'a StringArray),
    /// Absent in batches from before the column.
    policy: Option<(&'a DictionaryArray<Int32Type>, &'a StringArray)>,
    principals: [Option<(&'a DictionaryArray<Int32Type>, &'a StringArray)>; 2],
    mtls: &'a BooleanArray,
    trace_id: &'a FixedSizeBinaryArray,
    span_id: &'a FixedSizeBinaryArray,
    parent_span_id: &'a FixedSizeBinaryArray,
}

impl<'a> Columns<'a> {
    fn of(b: &'a RecordBatch) -> Result<Self, String> {
        let col = |name: &str| {
            b.column_by_name(name)
                .ok_or_else(|| format!("batch has no `{name}` column"))
        };
        let dict =
            |name: &str| -> Result<(&'a DictionaryArray<Int32Type>, &'a StringArray), String> {
                let d = col(name)?
                    .as_dictionary_opt::<Int32Type>()
                    .ok_or_else(|| format!("`{name}` is not a dictionary"))?;
                let v = d
                    .values()
                    .as_string_opt::<i32>()
                    .ok_or_else(|| format!("`{name}` values are not strings"))?;
                Ok((d, v))
            };
        let names_spec: [(&'static str, &'static str); 15] = [
            ("reporter", attr::REPORTER),
            ("source_service", attr::SOURCE_SERVICE),
            ("source_workload", attr::SOURCE_WORKLOAD),
            ("source_namespace", attr::SOURCE_NAMESPACE),
            ("source_version", attr::SOURCE_VERSION),
            ("destination_service", attr::DESTINATION_SERVICE),
            ("destination_workload", attr::DESTINATION_WORKLOAD),
            ("destination_namespace", attr::DESTINATION_NAMESPACE),
            ("destination_version", attr::DESTINATION_VERSION),
            ("protocol", attr::PROTOCOL),
            ("method", attr::METHOD),
            ("authority", attr::AUTHORITY),
            ("path", attr::PATH),
            ("route", attr::ROUTE),
            ("response_flags", attr::RESPONSE_FLAGS),
        ];
        let mut names = Vec::with_capacity(names_spec.len());
        for (column, key) in names_spec {
            let (d, v) = dict(column)?;
            names.push((key, d, v));
        }
        let position = |key: &str| position_of(&names, key);
        let prim = |name: &str| -> Result<&'a dyn Array, String> { Ok(col(name)?.as_ref()) };
        let ids = |name: &str| {
            col(name)?
                .as_fixed_size_binary_opt()
                .ok_or_else(|| format!("`{name}` is not fixed-size binary"))
        };
        Ok(Columns {
            time: col("time")?
                .as_primitive_opt::<TimestampMicrosecondType>()
                .ok_or("`time` is not a timestamp")?,
            duration_us: col("duration_us")?
                .as_primitive_opt()
                .ok_or("`duration_us` is not int64")?,
            method: position(attr::METHOD),
            destination_service: position(attr::DESTINATION_SERVICE),
            reporter: position(attr::REPORTER),
            names,
            status: col("status")?
                .as_primitive_opt()
                .ok_or("`status` is not int32")?,
            grpc_status: col("grpc_status")?
                .as_primitive_opt()
                .ok_or("`grpc_status` is not int32")?,
            ints: vec![
                (attr::REQUEST_BYTES, prim("request_bytes")?),
                (attr::RESPONSE_BYTES, prim("response_bytes")?),
                (attr::RETRIES, prim("retries")?),
            ],
            upstream: dict("upstream_address")?,
            policy: dict("policy").ok(),
            principals: [
                dict("source_principal").ok(),
                dict("destination_principal").ok(),
            ],
            mtls: col("mtls")?
                .as_boolean_opt()
                .ok_or("`mtls` is not boolean")?,
            trace_id: ids("trace_id")?,
            span_id: ids("span_id")?,
            parent_span_id: ids("parent_span_id")?,
        })
    }

    fn position(&self, key: &str) -> usize {
        position_of(&self.names, key)
    }

    fn name(&self, which: usize, row: usize) -> &'a str {
        let (_, d, v) = &self.names[which];
        if d.is_null(row) {
            return "";
        }
        v.value(d.keys().value(row) as usize)
    }

    fn span(&self, i: usize) -> Span {
        let s = |v: &str| any_value::Value::StringValue(v.into());
        let mut attributes: Vec<KeyValue> = (0..self.names.len())
            .map(|n| kv(self.names[n].0, s(self.name(n, i))))
            .collect();
        attributes.push(kv(
            attr::STATUS,
            any_value::Value::IntValue(i64::from(self.status.value(i))),
        ));
        for (key, column) in &self.ints {
            let v = if let Some(a) = column.as_primitive_opt::<arrow::datatypes::Int64Type>() {
                a.value(i)
            } else if let Some(a) = column.as_primitive_opt::<Int32Type>() {
                i64::from(a.value(i))
            } else {
                0
            };
            attributes.push(kv(key, any_value::Value::IntValue(v)));
        }
        attributes.push(kv(
            attr::MTLS,
            any_value::Value::BoolValue(self.mtls.value(i)),
        ));
        let grpc = (!self.grpc_status.is_null(i)).then(|| self.grpc_status.value(i));
        if let Some(g) = grpc {
            attributes.push(kv(
                attr::GRPC_STATUS,
                any_value::Value::IntValue(i64::from(g)),
            ));
        }
        let (ud, uv) = self.upstream;
        if !ud.is_null(i) {
            let u = uv.value(ud.keys().value(i) as usize);
            attributes.push(kv(attr::UPSTREAM_ADDRESS, s(u)));
        }
        if let Some((pd, pv)) = self.policy
            && !pd.is_null(i)
        {
            let p = pv.value(pd.keys().value(i) as usize);
            attributes.push(kv(attr::POLICY, s(p)));
        }
        for (name, column) in [attr::SOURCE_PRINCIPAL, attr::DESTINATION_PRINCIPAL]
            .into_iter()
            .zip(self.principals)
        {
            if let Some((pd, pv)) = column
                && !pd.is_null(i)
            {
                let p = pv.value(pd.keys().value(i) as usize);
                attributes.push(kv(name, s(p)));
            }
        }
        let start = self.time.value(i).max(0) as u64 * 1000;
        let end = start + self.duration_us.value(i).max(0) as u64 * 1000;
        let failed = self.status.value(i) >= 500 || grpc.is_some_and(|g| g != 0);
        let client = self.name(self.reporter, i) == "source";
        Span {
            trace_id: self.trace_id.value(i).to_vec(),
            span_id: self.span_id.value(i).to_vec(),
            parent_span_id: if self.parent_span_id.is_null(i) {
                Vec::new()
            } else {
                self.parent_span_id.value(i).to_vec()
            },
            name: format!(
                "{} {}",
                self.name(self.method, i),
                self.name(self.destination_service, i)
            ),
            kind: if client {
                span::SpanKind::Client
            } else {
                span::SpanKind::Server
            } as i32,
            start_time_unix_nano: start,
            end_time_unix_nano: end,
            attributes,
            status: failed.then(|| Status {
                code: status::StatusCode::Error as i32,
                message: String::new(),
            }),
            ..Default::default()
        }
    }
}

type Names<'a> = [(
    &'static str,
    &'a DictionaryArray<Int32Type>,
    &'a StringArray,
)];

fn position_of(names: &Names<'_>, key: &str) -> usize {
    names.iter().position(|(k, ..)| *k == key).unwrap_or(0)
}

/// A gRPC codec that sends protobuf bytes encoded already (a request
/// encoded once and retried, or several concatenated — protobuf merges
/// repeated fields so) and ignores the (empty) answer.
#[derive(Debug, Clone, Copy)]
pub struct PassThrough;

impl Codec for PassThrough {
    type Encode = Bytes;
    type Decode = ();
    type Encoder = PassThrough;
    type Decoder = PassThrough;

    fn encoder(&mut self) -> Self::Encoder {
        PassThrough
    }

    fn decoder(&mut self) -> Self::Decoder {
        PassThrough
    }
}

impl Encoder for PassThrough {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for PassThrough {
    type Item = ();
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
        src.advance(src.remaining());
        Ok(Some(()))
    }
}
