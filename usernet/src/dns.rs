//! The DNS wire format (RFC 1035), just enough for the gateway's responder: it parses the
//! guest's single-question queries and builds answers from the addresses the host's resolver
//! returned. Nothing here touches the network.
//!
//! Parsing is strict where laxness could confuse the host resolver (one question, no
//! compression, visible ASCII names) and ignores what it has no use for (answer, authority
//! and additional sections, so EDNS OPT records are dropped). Responses never exceed 512 bytes,
//! so they fit the plain-UDP limit whether or not the guest offered EDNS.

use std::net::IpAddr;

/// Record type A: an IPv4 address.
pub const TYPE_A: u16 = 1;
/// Record type AAAA: an IPv6 address.
pub const TYPE_AAAA: u16 = 28;
/// Class IN: the Internet.
pub const CLASS_IN: u16 = 1;

/// The largest response built: the classic UDP limit.
const MAX_RESPONSE: usize = 512;
const HEADER_LEN: usize = 12;
/// Longest name on the wire: length bytes, labels and the terminating zero.
const MAX_NAME: usize = 255;
const MAX_LABEL: u8 = 63;

const FLAG_QR: u16 = 0x8000;
const FLAG_RD: u16 = 0x0100;
const FLAG_RA: u16 = 0x0080;
const OPCODE_SHIFT: u16 = 11;
const OPCODE_MASK: u16 = 0x7800;

/// A parsed query: its header fields and its one question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// The transaction id, echoed in the response.
    pub id: u16,
    /// The name asked about, labels joined by `.`, no trailing dot, case as sent; empty for
    /// the root.
    pub name: String,
    /// The record type asked for ([`TYPE_A`], [`TYPE_AAAA`], ...).
    pub qtype: u16,
    /// The class asked for, normally [`CLASS_IN`].
    pub qclass: u16,
    /// The RD flag, copied to the response.
    pub recursion_desired: bool,
    /// The question section as received, echoed byte for byte in responses.
    question: Vec<u8>,
}

/// Why a packet is not a query this responder answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// The packet ends inside the header or the question.
    #[error("DNS packet truncated")]
    Truncated,
    /// The QR bit is set: a response, which is never answered.
    #[error("DNS packet is a response, not a query")]
    NotAQuery,
    /// An opcode other than QUERY (0); answer with [`Rcode::NotImp`].
    #[error("unsupported DNS opcode {0}")]
    Opcode(u8),
    /// QDCOUNT is not 1.
    #[error("DNS query has {0} questions, expected 1")]
    QuestionCount(u16),
    /// The question's name uses a compression pointer (meaningless in a question).
    #[error("compression pointer in a DNS question name")]
    CompressedName,
    /// A label length byte over 63 (also the reserved 0x40 and 0x80 label types).
    #[error("DNS label length {0} is over 63")]
    LabelTooLong(u8),
    /// The name is over 255 bytes on the wire.
    #[error("DNS name longer than 255 bytes")]
    NameTooLong,
    /// A label holds a byte outside visible ASCII (0x21..=0x7e) or a `.`.
    #[error("DNS name has a byte that is not visible ASCII, or a dot inside a label")]
    BadName,
}

/// A response code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Rcode {
    /// No error.
    NoError = 0,
    /// The query was malformed.
    FormErr = 1,
    /// The server failed (e.g. the host resolver did).
    ServFail = 2,
    /// The name does not exist.
    NxDomain = 3,
    /// The kind of query is not supported.
    NotImp = 4,
    /// The server refuses to answer (e.g. policy).
    Refused = 5,
}

fn be16(packet: &[u8], at: usize) -> Option<u16> {
    match packet.get(at..at.checked_add(2)?)? {
        [hi, lo] => Some(u16::from_be_bytes([*hi, *lo])),
        _ => None,
    }
}

/// Parses a query with exactly one question.
pub fn parse_query(packet: &[u8]) -> Result<Query, DnsError> {
    let (id, flags) = match (be16(packet, 0), be16(packet, 2), packet.len() >= HEADER_LEN) {
        (Some(id), Some(flags), true) => (id, flags),
        _ => return Err(DnsError::Truncated),
    };
    if flags & FLAG_QR != 0 {
        return Err(DnsError::NotAQuery);
    }
    let opcode = ((flags & OPCODE_MASK) >> OPCODE_SHIFT) as u8;
    if opcode != 0 {
        return Err(DnsError::Opcode(opcode));
    }
    let qdcount = be16(packet, 4).ok_or(DnsError::Truncated)?;
    if qdcount != 1 {
        return Err(DnsError::QuestionCount(qdcount));
    }

    let mut pos = HEADER_LEN;
    let mut name = String::new();
    loop {
        let len = *packet.get(pos).ok_or(DnsError::Truncated)?;
        if len & 0xC0 == 0xC0 {
            return Err(DnsError::CompressedName);
        }
        if len > MAX_LABEL {
            return Err(DnsError::LabelTooLong(len));
        }
        pos += 1;
        if pos - HEADER_LEN + usize::from(len) > MAX_NAME {
            return Err(DnsError::NameTooLong);
        }
        if len == 0 {
            break;
        }
        let label = packet
            .get(pos..pos + usize::from(len))
            .ok_or(DnsError::Truncated)?;
        if !label.iter().all(|&b| b.is_ascii_graphic() && b != b'.') {
            return Err(DnsError::BadName);
        }
        if !name.is_empty() {
            name.push('.');
        }
        name.extend(label.iter().map(|&b| char::from(b)));
        pos += usize::from(len);
    }
    let qtype = be16(packet, pos).ok_or(DnsError::Truncated)?;
    let qclass = be16(packet, pos + 2).ok_or(DnsError::Truncated)?;
    let question = packet
        .get(HEADER_LEN..pos + 4)
        .ok_or(DnsError::Truncated)?
        .to_vec();
    Ok(Query {
        id,
        name,
        qtype,
        qclass,
        recursion_desired: flags & FLAG_RD != 0,
        question,
    })
}

fn header(id: u16, opcode_rd: u16, rcode: Rcode, qdcount: u16, ancount: u16) -> Vec<u8> {
    let flags = FLAG_QR | FLAG_RA | (opcode_rd & (OPCODE_MASK | FLAG_RD)) | rcode as u16;
    let mut out = Vec::with_capacity(MAX_RESPONSE);
    for field in [id, flags, qdcount, ancount, 0, 0] {
        out.extend_from_slice(&field.to_be_bytes());
    }
    out
}

fn query_flags(q: &Query) -> u16 {
    if q.recursion_desired {
        FLAG_RD
    } else {
        0
    }
}

/// A NOERROR response to `q` with one record per address of the asked type (A: the IPv4
/// ones, AAAA: the IPv6 ones; the rest skipped), each named by a pointer to the question and
/// carrying `ttl`. An empty answer section is a valid "no data" answer; so is any query whose
/// class is not IN or whose type is neither A nor AAAA. Stops adding records before the
/// response would pass 512 bytes.
pub fn answer(q: &Query, addrs: &[IpAddr], ttl: u32) -> Vec<u8> {
    let mut out = header(q.id, query_flags(q), Rcode::NoError, 1, 0);
    out.extend_from_slice(&q.question);
    let mut count: u16 = 0;
    if q.qclass == CLASS_IN {
        for addr in addrs {
            let rdata: &[u8] = match (q.qtype, addr) {
                (TYPE_A, IpAddr::V4(v4)) => &v4.octets(),
                (TYPE_AAAA, IpAddr::V6(v6)) => &v6.octets(),
                _ => continue,
            };
            // Name pointer (2), type, class, TTL (4), rdlength, rdata.
            if out.len() + 12 + rdata.len() > MAX_RESPONSE {
                break;
            }
            // The question name always starts right after the header, at offset 12.
            out.extend_from_slice(&[0xC0, 0x0C]);
            out.extend_from_slice(&q.qtype.to_be_bytes());
            out.extend_from_slice(&CLASS_IN.to_be_bytes());
            out.extend_from_slice(&ttl.to_be_bytes());
            out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            out.extend_from_slice(rdata);
            count += 1;
        }
    }
    out[6..8].copy_from_slice(&count.to_be_bytes());
    out
}

/// A response to `q` with `rcode`, the question echoed and no records.
pub fn error_response(q: &Query, rcode: Rcode) -> Vec<u8> {
    let mut out = header(q.id, query_flags(q), rcode, 1, 0);
    out.extend_from_slice(&q.question);
    out
}

/// A header-only response with `rcode` to a packet [`parse_query`] refused, echoing its id,
/// opcode and RD flag: e.g. [`Rcode::NotImp`] for [`DnsError::Opcode`]. `None` when the
/// packet is shorter than a header or is itself a response (answering those could loop).
pub fn error_for_packet(packet: &[u8], rcode: Rcode) -> Option<Vec<u8>> {
    if packet.len() < HEADER_LEN {
        return None;
    }
    let id = be16(packet, 0)?;
    let flags = be16(packet, 2)?;
    if flags & FLAG_QR != 0 {
        return None;
    }
    Some(header(id, flags, rcode, 0, 0))
}

/// A FORMERR response to a packet [`parse_query`] refused, echoing its id, when it has at
/// least a header and is a query (QR=0); `None` otherwise, so a response is never answered.
pub fn format_error(packet: &[u8]) -> Option<Vec<u8>> {
    error_for_packet(packet, Rcode::FormErr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// "example.com" IN A, id 0x1234, RD set.
    const EXAMPLE_A: &[u8] = &[
        0x12, 0x34, // id
        0x01, 0x00, // flags: RD
        0x00, 0x01, // qdcount
        0x00, 0x00, // ancount
        0x00, 0x00, // nscount
        0x00, 0x00, // arcount
        7, b'e', b'x', b'a', b'm', b'p', b'l', b'e', // label
        3, b'c', b'o', b'm', // label
        0,    // root
        0x00, 0x01, // type A
        0x00, 0x01, // class IN
    ];

    const QUESTION_LEN: usize = 13 + 4;

    fn query_for(name: &[&str], qtype: u16) -> Vec<u8> {
        let mut p = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name {
            p.push(label.len() as u8);
            p.extend_from_slice(label.as_bytes());
        }
        p.push(0);
        p.extend_from_slice(&qtype.to_be_bytes());
        p.extend_from_slice(&CLASS_IN.to_be_bytes());
        p
    }

    fn u16_at(p: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([p[at], p[at + 1]])
    }

    /// Checks a response's header and question, returns (flags, ancount, answers offset).
    fn check_response(resp: &[u8], query: &[u8]) -> (u16, u16, usize) {
        assert_eq!(&resp[0..2], &query[0..2], "id");
        let flags = u16_at(resp, 2);
        assert_ne!(flags & FLAG_QR, 0, "QR");
        assert_eq!(flags & 0x0400, 0, "AA");
        assert_eq!(flags & 0x0200, 0, "TC");
        assert_ne!(flags & FLAG_RA, 0, "RA");
        assert_eq!(flags & FLAG_RD, u16_at(query, 2) & FLAG_RD, "RD");
        assert_eq!(u16_at(resp, 4), 1, "qdcount");
        assert_eq!(u16_at(resp, 8), 0, "nscount");
        assert_eq!(u16_at(resp, 10), 0, "arcount");
        let qlen = parse_query(query).unwrap().question.len();
        assert_eq!(&resp[12..12 + qlen], &query[12..12 + qlen], "question");
        (flags, u16_at(resp, 6), 12 + qlen)
    }

    #[test]
    fn parses_example_com() {
        let q = parse_query(EXAMPLE_A).unwrap();
        assert_eq!(q.id, 0x1234);
        assert_eq!(q.name, "example.com");
        assert_eq!(q.qtype, TYPE_A);
        assert_eq!(q.qclass, CLASS_IN);
        assert!(q.recursion_desired);
        assert_eq!(q.question, &EXAMPLE_A[12..]);
        assert_eq!(q.question.len(), QUESTION_LEN);
    }

    #[test]
    fn keeps_case_and_accepts_root() {
        let q = parse_query(&query_for(&["WwW", "Example", "COM"], TYPE_AAAA)).unwrap();
        assert_eq!(q.name, "WwW.Example.COM");
        assert_eq!(q.qtype, TYPE_AAAA);
        assert!(parse_query(&query_for(&[], TYPE_A))
            .unwrap()
            .name
            .is_empty());
    }

    #[test]
    fn ignores_edns_opt() {
        let mut p = EXAMPLE_A.to_vec();
        p[11] = 1; // arcount
        p.extend_from_slice(&[
            0, // root name
            0x00, 0x29, // type OPT
            0x10, 0x00, // UDP payload size 4096
            0, 0, 0, 0, // extended rcode, version, flags
            0x00, 0x00, // rdlength
        ]);
        let q = parse_query(&p).unwrap();
        assert_eq!(q.name, "example.com");
        assert_eq!(q.question, &EXAMPLE_A[12..]);
        let resp = answer(&q, &[IpAddr::V4(Ipv4Addr::new(1, 2, 3, 4))], 60);
        assert_eq!(u16_at(&resp, 10), 0, "OPT not echoed");
        assert_eq!(resp.len(), 12 + QUESTION_LEN + 16);
    }

    #[test]
    fn rejects_bad_queries() {
        // Compression pointer in place of the first label.
        let mut p = EXAMPLE_A[..12].to_vec();
        p.extend_from_slice(&[0xC0, 0x0C, 0, 1, 0, 1]);
        assert_eq!(parse_query(&p), Err(DnsError::CompressedName));
        // Pointer after a label.
        let mut p = EXAMPLE_A[..12].to_vec();
        p.extend_from_slice(&[1, b'a', 0xC0, 0x0C, 0, 1, 0, 1]);
        assert_eq!(parse_query(&p), Err(DnsError::CompressedName));
        // 64-byte label.
        let long = "a".repeat(64);
        let long = long.as_str();
        assert_eq!(
            parse_query(&query_for(&[long], TYPE_A)),
            Err(DnsError::LabelTooLong(64))
        );
        let ok = "a".repeat(63);
        let ok = ok.as_str();
        assert!(parse_query(&query_for(&[ok], TYPE_A)).is_ok());
        // Reserved label type 0x80.
        let mut p = EXAMPLE_A.to_vec();
        p[12] = 0x80;
        assert_eq!(parse_query(&p), Err(DnsError::LabelTooLong(0x80)));
        // Names of 4 * 64 + 1 = 257 and 3 * 64 + 63 + 1 = 256 bytes; 3 * 64 + 62 + 1 = 255 fits.
        assert_eq!(
            parse_query(&query_for(&[ok, ok, ok, ok], TYPE_A)),
            Err(DnsError::NameTooLong)
        );
        let last = "a".repeat(61);
        let last = last.as_str();
        assert!(parse_query(&query_for(&[ok, ok, ok, last], TYPE_A)).is_ok());
        let last = "a".repeat(62);
        let last = last.as_str();
        assert_eq!(
            parse_query(&query_for(&[ok, ok, ok, last], TYPE_A)),
            Err(DnsError::NameTooLong)
        );
        // Zero and two questions.
        let mut p = EXAMPLE_A.to_vec();
        p[5] = 0;
        assert_eq!(parse_query(&p), Err(DnsError::QuestionCount(0)));
        p[5] = 2;
        assert_eq!(parse_query(&p), Err(DnsError::QuestionCount(2)));
        // A response.
        let mut p = EXAMPLE_A.to_vec();
        p[2] |= 0x80;
        assert_eq!(parse_query(&p), Err(DnsError::NotAQuery));
        // Opcode 2 (STATUS).
        let mut p = EXAMPLE_A.to_vec();
        p[2] |= 2 << 3;
        assert_eq!(parse_query(&p), Err(DnsError::Opcode(2)));
        // Short header.
        assert_eq!(parse_query(&EXAMPLE_A[..11]), Err(DnsError::Truncated));
        assert_eq!(parse_query(&[]), Err(DnsError::Truncated));
        // Bad bytes in a label.
        for bad in [b'.', b' ', 0x00, 0x7f, 0xe9] {
            let mut p = EXAMPLE_A.to_vec();
            p[14] = bad;
            assert_eq!(parse_query(&p), Err(DnsError::BadName), "{bad:#x}");
        }
    }

    #[test]
    fn every_truncation_is_truncated() {
        for len in 0..EXAMPLE_A.len() {
            assert_eq!(
                parse_query(&EXAMPLE_A[..len]),
                Err(DnsError::Truncated),
                "{len}"
            );
        }
    }

    #[test]
    fn answer_round_trips() {
        let q = parse_query(EXAMPLE_A).unwrap();
        let addrs = [
            IpAddr::V4(Ipv4Addr::new(93, 184, 216, 34)),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
        ];
        let resp = answer(&q, &addrs, 0x0102_0304);
        let (flags, ancount, mut at) = check_response(&resp, EXAMPLE_A);
        assert_eq!(flags & 0x000f, 0, "rcode");
        assert_eq!(flags & OPCODE_MASK, 0, "opcode");
        assert_eq!(ancount, 2);
        for want in [[93, 184, 216, 34], [10, 0, 0, 1]] {
            assert_eq!(&resp[at..at + 2], &[0xC0, 0x0C], "pointer");
            assert_eq!(u16_at(&resp, at + 2), TYPE_A);
            assert_eq!(u16_at(&resp, at + 4), CLASS_IN);
            assert_eq!(&resp[at + 6..at + 10], &[1, 2, 3, 4], "ttl");
            assert_eq!(u16_at(&resp, at + 10), 4, "rdlength");
            assert_eq!(&resp[at + 12..at + 16], &want);
            at += 16;
        }
        assert_eq!(at, resp.len());
    }

    #[test]
    fn aaaa_answer() {
        let p = query_for(&["example", "com"], TYPE_AAAA);
        let q = parse_query(&p).unwrap();
        let v6: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let resp = answer(&q, &[IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(v6)], 30);
        let (_, ancount, at) = check_response(&resp, &p);
        assert_eq!(ancount, 1);
        assert_eq!(u16_at(&resp, at + 2), TYPE_AAAA);
        assert_eq!(u16_at(&resp, at + 10), 16);
        assert_eq!(&resp[at + 12..], &v6.octets());

        // Only IPv4 addresses: a "no data" answer.
        let resp = answer(&q, &[IpAddr::V4(Ipv4Addr::LOCALHOST)], 30);
        let (flags, ancount, at) = check_response(&resp, &p);
        assert_eq!(flags & 0x000f, 0);
        assert_eq!(ancount, 0);
        assert_eq!(at, resp.len());
    }

    #[test]
    fn other_types_and_classes_get_no_records() {
        let addrs = [IpAddr::V4(Ipv4Addr::LOCALHOST)];
        let mx = query_for(&["example", "com"], 15);
        let resp = answer(&parse_query(&mx).unwrap(), &addrs, 30);
        assert_eq!(check_response(&resp, &mx).1, 0);
        let mut ch = EXAMPLE_A.to_vec();
        let last = ch.len() - 1;
        ch[last] = 3; // class CH
        let resp = answer(&parse_query(&ch).unwrap(), &addrs, 30);
        assert_eq!(check_response(&resp, &ch).1, 0);
    }

    #[test]
    fn nxdomain() {
        let mut p = EXAMPLE_A.to_vec();
        p[2] = 0; // RD clear
        let q = parse_query(&p).unwrap();
        let resp = error_response(&q, Rcode::NxDomain);
        let (flags, ancount, at) = check_response(&resp, &p);
        assert_eq!(flags & 0x000f, 3);
        assert_eq!(flags & FLAG_RD, 0);
        assert_eq!(ancount, 0);
        assert_eq!(at, resp.len());
    }

    #[test]
    fn format_error_answers_only_queries() {
        let mut p = EXAMPLE_A.to_vec();
        p[5] = 0;
        let resp = format_error(&p).unwrap();
        assert_eq!(resp.len(), 12);
        assert_eq!(&resp[0..2], &[0x12, 0x34]);
        let flags = u16_at(&resp, 2);
        assert_ne!(flags & FLAG_QR, 0);
        assert_eq!(flags & 0x000f, 1);
        assert_eq!(&resp[4..], &[0; 8]);

        let mut response = EXAMPLE_A.to_vec();
        response[2] |= 0x80;
        assert_eq!(format_error(&response), None);
        assert_eq!(format_error(&EXAMPLE_A[..11]), None);
        assert_eq!(format_error(&[]), None);

        // NOTIMP for an unknown opcode echoes the opcode.
        let mut p = EXAMPLE_A.to_vec();
        p[2] |= 5 << 3;
        assert_eq!(parse_query(&p), Err(DnsError::Opcode(5)));
        let resp = error_for_packet(&p, Rcode::NotImp).unwrap();
        assert_eq!(u16_at(&resp, 2), 0x8000 | (5 << 11) | FLAG_RD | FLAG_RA | 4);
    }

    #[test]
    fn many_addresses_fit_512() {
        let long = "a".repeat(63);
        let long = long.as_str();
        for name in [vec!["example", "com"], vec![long, long, long, "b"]] {
            let p = query_for(&name, TYPE_A);
            let q = parse_query(&p).unwrap();
            let addrs: Vec<IpAddr> = (0..50u8)
                .map(|i| IpAddr::V4(Ipv4Addr::new(10, 0, 0, i)))
                .collect();
            let resp = answer(&q, &addrs, 5);
            assert!(resp.len() <= 512, "{}", resp.len());
            let (_, ancount, mut at) = check_response(&resp, &p);
            assert!(ancount > 0);
            for i in 0..ancount {
                assert_eq!(&resp[at..at + 2], &[0xC0, 0x0C]);
                assert_eq!(u16_at(&resp, at + 10), 4);
                assert_eq!(&resp[at + 12..at + 16], &[10, 0, 0, i as u8]);
                at += 16;
            }
            assert_eq!(at, resp.len());
            // No room was left for one more.
            assert!(resp.len() + 16 > 512);

            let q6 = parse_query(&query_for(&name, TYPE_AAAA)).unwrap();
            let addrs: Vec<IpAddr> = (0..50u16)
                .map(|i| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i)))
                .collect();
            let resp = answer(&q6, &addrs, 5);
            assert!(resp.len() <= 512 && resp.len() + 28 > 512);
        }
    }

    #[test]
    fn never_panics() {
        fn exercise(p: &[u8]) {
            if let Ok(q) = parse_query(p) {
                let addrs = [
                    IpAddr::V4(Ipv4Addr::LOCALHOST),
                    IpAddr::V6(Ipv6Addr::LOCALHOST),
                ];
                assert!(answer(&q, &addrs, 1).len() <= 512);
                let _ = error_response(&q, Rcode::ServFail);
            }
            let _ = format_error(p);
            let _ = error_for_packet(p, Rcode::NotImp);
        }

        let mut edns = EXAMPLE_A.to_vec();
        edns[11] = 1;
        edns.extend_from_slice(&[0, 0, 0x29, 0x10, 0, 0, 0, 0, 0, 0, 0]);
        for len in 0..=edns.len() {
            exercise(&edns[..len]);
        }

        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for i in 0..5000 {
            let len = (next() % 80) as usize;
            let mut p: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Make most of them look like queries so the name parser gets exercised.
            if i % 4 != 0 && p.len() >= 12 {
                p[2] &= 0x07;
                p[4] = 0;
                p[5] = 1;
                if i % 2 == 0 {
                    // Small label lengths so some names end inside the packet.
                    for b in p.iter_mut().skip(12).step_by(3) {
                        *b &= 0x0f;
                    }
                }
            }
            exercise(&p);
        }
    }
}
