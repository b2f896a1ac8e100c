//! The etcd v3 gRPC messages Turbine sends and reads, declared by hand with `prost`'s derive.
//!
//! Declaring them here rather than generating them from etcd's `.proto` files at build time
//! is what keeps `protoc` out of the build. Only the fields Turbine uses are declared:
//! protobuf decoders skip fields they do not know, so a subset is wire-compatible with
//! every etcd 3.x server. Tags and types follow `api/etcdserverpb/rpc.proto` and
//! `api/mvccpb/kv.proto` of etcd 3.5; `tests` below pins the encodings byte for byte.

/// Every response's header: the store revision the answer reflects.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResponseHeader {
    #[prost(uint64, tag = "1")]
    pub cluster_id: u64,
    #[prost(uint64, tag = "2")]
    pub member_id: u64,
    #[prost(int64, tag = "3")]
    pub revision: i64,
    #[prost(uint64, tag = "4")]
    pub raft_term: u64,
}

/// A stored key (`mvccpb.KeyValue`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(int64, tag = "2")]
    pub create_revision: i64,
    #[prost(int64, tag = "3")]
    pub mod_revision: i64,
    #[prost(int64, tag = "4")]
    pub version: i64,
    #[prost(bytes = "vec", tag = "5")]
    pub value: Vec<u8>,
    #[prost(int64, tag = "6")]
    pub lease: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum SortOrder {
    None = 0,
    Ascend = 1,
    Descend = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum SortTarget {
    Key = 0,
    Version = 1,
    Create = 2,
    Mod = 3,
    Value = 4,
}

/// Reads `[key, range_end)`; an empty `range_end` reads `key` alone.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RangeRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub range_end: Vec<u8>,
    #[prost(int64, tag = "3")]
    pub limit: i64,
    /// 0 reads the newest revision.
    #[prost(int64, tag = "4")]
    pub revision: i64,
    #[prost(enumeration = "SortOrder", tag = "5")]
    pub sort_order: i32,
    #[prost(enumeration = "SortTarget", tag = "6")]
    pub sort_target: i32,
    #[prost(bool, tag = "9")]
    pub count_only: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RangeResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(message, repeated, tag = "2")]
    pub kvs: Vec<KeyValue>,
    #[prost(bool, tag = "3")]
    pub more: bool,
    #[prost(int64, tag = "4")]
    pub count: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
    /// 0 attaches no lease.
    #[prost(int64, tag = "3")]
    pub lease: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PutResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DeleteRangeRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub range_end: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DeleteRangeResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(int64, tag = "2")]
    pub deleted: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CompactionRequest {
    #[prost(int64, tag = "1")]
    pub revision: i64,
    /// Wait until the compaction is applied to the backend, not only scheduled.
    #[prost(bool, tag = "2")]
    pub physical: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CompactionResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
}

/// etcd's `WatchRequest` is a oneof of create, cancel and progress requests; only create is
/// ever sent, and a oneof with one member set encodes exactly as that field.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchRequest {
    #[prost(message, optional, tag = "1")]
    pub create_request: Option<WatchCreateRequest>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchCreateRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub range_end: Vec<u8>,
    /// The first revision to report; 0 starts after the current one.
    #[prost(int64, tag = "3")]
    pub start_revision: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(int64, tag = "2")]
    pub watch_id: i64,
    #[prost(bool, tag = "3")]
    pub created: bool,
    #[prost(bool, tag = "4")]
    pub canceled: bool,
    /// Non-zero when the requested start revision has been compacted away: the watch is
    /// cancelled and this is the oldest revision still kept.
    #[prost(int64, tag = "5")]
    pub compact_revision: i64,
    #[prost(string, tag = "6")]
    pub cancel_reason: String,
    #[prost(message, repeated, tag = "11")]
    pub events: Vec<Event>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum EventType {
    Put = 0,
    Delete = 1,
}

/// One change in a watch (`mvccpb.Event`); a delete's `kv` carries the key and the
/// revision of the delete.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(enumeration = "EventType", tag = "1")]
    pub r#type: i32,
    #[prost(message, optional, tag = "2")]
    pub kv: Option<KeyValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseGrantRequest {
    #[prost(int64, tag = "1")]
    pub ttl: i64,
    /// 0 lets etcd choose the id.
    #[prost(int64, tag = "2")]
    pub id: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseGrantResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(int64, tag = "2")]
    pub id: i64,
    #[prost(int64, tag = "3")]
    pub ttl: i64,
    #[prost(string, tag = "4")]
    pub error: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseRevokeRequest {
    #[prost(int64, tag = "1")]
    pub id: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseRevokeResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseKeepAliveRequest {
    #[prost(int64, tag = "1")]
    pub id: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseKeepAliveResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(int64, tag = "2")]
    pub id: i64,
    /// The lease's new TTL in seconds; 0 when etcd has no such lease.
    #[prost(int64, tag = "3")]
    pub ttl: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseTimeToLiveRequest {
    #[prost(int64, tag = "1")]
    pub id: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseTimeToLiveResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(int64, tag = "2")]
    pub id: i64,
    /// Seconds left; -1 when the lease has expired or never existed.
    #[prost(int64, tag = "3")]
    pub ttl: i64,
    #[prost(int64, tag = "4")]
    pub granted_ttl: i64,
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn encoded(message: &impl Message) -> Vec<u8> {
        message.encode_to_vec()
    }

    // Expected bytes are written out from the protobuf encoding rules: each field is
    // (tag << 3 | wire type) then its value, varints for integers and enums, length-prefixed
    // bytes for strings and messages. A wrong tag or type here is a request etcd misreads.
    #[test]
    fn requests_encode_with_etcds_tags() {
        let range = RangeRequest {
            key: b"a".to_vec(),
            range_end: b"b".to_vec(),
            limit: 0,
            revision: 7,
            sort_order: SortOrder::Ascend as i32,
            sort_target: SortTarget::Mod as i32,
            count_only: true,
        };
        assert_eq!(
            encoded(&range),
            [0x0a, 1, b'a', 0x12, 1, b'b', 0x20, 7, 0x28, 1, 0x30, 3, 0x48, 1]
        );
        let put = PutRequest {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            lease: 300,
        };
        assert_eq!(encoded(&put), [0x0a, 1, b'k', 0x12, 1, b'v', 0x18, 0xac, 0x02]);
        let delete = DeleteRangeRequest {
            key: b"k".to_vec(),
            range_end: Vec::new(),
        };
        assert_eq!(encoded(&delete), [0x0a, 1, b'k']);
        let compact = CompactionRequest {
            revision: 5,
            physical: true,
        };
        assert_eq!(encoded(&compact), [0x08, 5, 0x10, 1]);
        let watch = WatchRequest {
            create_request: Some(WatchCreateRequest {
                key: b"p".to_vec(),
                range_end: b"q".to_vec(),
                start_revision: 9,
            }),
        };
        assert_eq!(encoded(&watch), [0x0a, 8, 0x0a, 1, b'p', 0x12, 1, b'q', 0x18, 9]);
        assert_eq!(encoded(&LeaseGrantRequest { ttl: 10, id: 0 }), [0x08, 10]);
        assert_eq!(encoded(&LeaseRevokeRequest { id: 2 }), [0x08, 2]);
        assert_eq!(encoded(&LeaseKeepAliveRequest { id: 3 }), [0x08, 3]);
        assert_eq!(encoded(&LeaseTimeToLiveRequest { id: 4 }), [0x08, 4]);
    }

    #[test]
    fn responses_decode_and_skip_unknown_fields() {
        // A watch response as etcd sends it: header{revision: 12}, watch_id 1, one DELETE
        // event whose kv has key "k" and mod_revision 12, and a fragment flag (tag 7) this
        // client does not declare.
        let bytes = [
            0x0a, 2, 0x18, 12, // header
            0x10, 1, // watch_id
            0x38, 1, // fragment: unknown here, skipped
            0x5a, 9, 0x08, 1, 0x12, 5, 0x0a, 1, b'k', 0x18, 12, // events[0]
        ];
        let response = WatchResponse::decode(&bytes[..]).expect("decodes");
        assert_eq!(response.header.as_ref().map(|h| h.revision), Some(12));
        assert_eq!(response.watch_id, 1);
        assert_eq!(response.events.len(), 1);
        let event = &response.events[0];
        assert_eq!(event.r#type(), EventType::Delete);
        let kv = event.kv.as_ref().expect("kv");
        assert_eq!((kv.key.as_slice(), kv.mod_revision), (&b"k"[..], 12));

        // LeaseTimeToLive for an expired lease: TTL -1 (a negative int64 is a ten-byte varint).
        let mut bytes = vec![0x10, 4, 0x18];
        bytes.extend([0xff; 9]);
        bytes.push(0x01);
        let response = LeaseTimeToLiveResponse::decode(&bytes[..]).expect("decodes");
        assert_eq!((response.id, response.ttl), (4, -1));
    }
}
