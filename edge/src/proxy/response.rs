//! Responses (RFC 3261 §16.7, stateless): the top Via must be this edge's, with a branch that
//! verifies against the Via below it; that top Via is removed and the response goes where the next
//! Via says (`received`/`rport` first). Anything else is dropped: a stateless proxy that relays
//! responses it did not cause is a reflector.

use super::via::{self, ViaInfo};
use super::{Action, Decision, Inbound, Outcome, Proxy, Side};
use crate::sip::{Edit, HeaderName, Message};

pub(super) fn handle(p: &Proxy, m: &Message<'_>, _inb: &Inbound<'_>, side: Side) -> Decision {
    let drop = |reason: &str| Decision {
        action: Action::Drop,
        outcome: Outcome::Dropped,
        side,
        reason: Some(reason.to_string()),
    };
    let mut vias = m.elements(HeaderName::Via);
    let Some((top_header, top_range)) = vias.next() else {
        return drop("response without Via");
    };
    let Some(top) = ViaInfo::parse(m.text(top_range.clone())) else {
        return drop("response with unreadable Via");
    };
    if !p.is_self(top.host, top.port) {
        return drop("response whose top Via is not this edge");
    }
    let Some((next_header, next_range)) = vias.next() else {
        return drop("response addressed to the edge itself");
    };
    let Some(next) = ViaInfo::parse(m.text(next_range.clone())) else {
        return drop("response with unreadable second Via");
    };
    let (Some(call_id), Some((cseq, _))) = (m.call_id(), m.cseq()) else {
        return drop("response without Call-ID or CSeq");
    };
    let ours = top.branch.unwrap_or("");
    if !via::verify_branch(&p.keys, ours, &next, call_id, cseq) {
        return drop("response whose Via branch does not verify (forged or altered Via)");
    }

    // Our Via goes: its whole line when it is alone there, else up to the next element (the
    // comma and white space with it), the rest of the line as it came.
    let mut e = Edit::new(m.buf);
    if next_header == top_header {
        e.remove(top_range.start..next_range.start);
    } else {
        e.remove(m.headers[top_header].line.clone());
    }
    let listener = p.listener_toward(
        match side {
            Side::Internet => Side::Pbx,
            Side::Pbx => Side::Internet,
        },
        next.transport,
    );
    Decision {
        action: Action::Forward {
            transport: next.transport,
            dest: next.response_target(),
            listener,
            bytes: e.finish(),
        },
        outcome: Outcome::Forwarded,
        side,
        reason: None,
    }
}
