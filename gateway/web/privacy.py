"""The privacy policy page, stated as the code keeps it: limits and columns are read from the code itself."""

from __future__ import annotations

from ledger.ledger import DEFAULT_BUCKET_LIFE_S, MAX_LIVE_KEYS
from ledger.store import METERING_COLUMNS

from .render import esc
from .sessions import SESSION_MAX_AGE_S

__all__ = ["privacy_body"]

_NUMBERS = {1: "one", 2: "two", 3: "three"}


def privacy_body() -> str:
    life_days = DEFAULT_BUCKET_LIFE_S // 86400
    keys = _NUMBERS.get(MAX_LIVE_KEYS, str(MAX_LIVE_KEYS))
    columns = ", ".join(f"<code>{esc(c)}</code>" for c in METERING_COLUMNS)
    return f"""<article class="policy"><h1>Privacy Policy</h1>
<p class="muted">Effective date: to be set at launch.</p>
<section id="who"><h2>1. Who we are</h2>
<p>Coding Plan provides a prepaid API gateway for agentic AI coding. You prepay credit, call our API from your
coding tools, and we forward your requests to an upstream model service.</p></section>
<section id="not-stored"><h2>2. What we do NOT store</h2>
<p>We do not store your prompt content or the model's output content. We do not log the text of your requests
or of the model's responses. Your prompts and outputs pass through our servers in memory only, to translate
between API formats and to count tokens for billing, and are never written to our database, our logs, or our
backups. Our logs carry request ids and counts only.</p></section>
<section id="collected"><h2>3. What we do collect and store</h2>
<ul>
<li id="p-account"><strong>Account:</strong> when you sign in with Google, we keep your Google account email
and a stable Google account identifier (<code>sub</code>). Nothing else from Google is stored: not your name
or picture, not Google's tokens, and we never see or store your Google password. Your browser holds one
encrypted session cookie with ids only; it lasts at most {SESSION_MAX_AGE_S // 86400} days and ends when you sign out.</li>
<li id="p-keys"><strong>API keys:</strong> you may create up to {keys} API keys. Keys are stored as one-way
(SHA-256) hashes: the full key is shown to you exactly once, at creation or renewal, and cannot be recovered
by us. If you lose a key, you must renew it; the old key stops working at once.</li>
<li id="p-payments"><strong>Payment metadata:</strong> top-ups are processed by Omise (Opn Payments). We keep
the Omise charge identifier, the amount and the charge status. We do not store your card number, CVV or full
card details: those are handled entirely by Omise.</li>
<li id="p-metering"><strong>Metering data:</strong> for each API request we store token counts (input
cache-hit, input cache-miss, output), the model used, the charge, the credit buckets it was drawn from, and
timestamps. No content. These are exactly the columns of your export: {columns}.</li>
<li id="p-history"><strong>Top-up and balance history:</strong> your top-up records, current credit
balance, and per-bucket expiry timestamps.</li>
</ul></section>
<section id="retention"><h2>4. How long we keep data</h2>
<ul>
<li id="p-buckets"><strong>Credit buckets:</strong> a bucket expires {life_days} days after its top-up.
Remaining balance is forfeited at expiry. The transaction record is retained for accounting.</li>
<li id="p-metering-kept"><strong>Metering metadata</strong> (token counts, charges): retained for audit and
dispute resolution.</li>
<li id="p-account-kept"><strong>Account data:</strong> retained until you close your account. Closing revokes
your API keys at once, signs you out, and erases your email and Google identifier; transaction and metering
records are kept for accounting under an anonymous account id, without personal data. Signing in again later
creates a new, empty account.</li>
</ul></section>
<section id="refunds"><h2>5. Refunds</h2>
<p>Unused balance is refundable before a top-up's {life_days}-day expiry. Consumed credit and expired credit
are non-refundable. When you close your account, unused top-up credit is refunded first; what remains (grants, trial credit) is forfeited.
See the Terms of Service.</p></section>
<section id="payments"><h2>6. Payment processing</h2>
<p>Omise is the data controller for your payment details. We do not receive or store full card data.</p></section>
<section id="sharing"><h2>7. Sharing your data</h2>
<p>We do not sell your data. We share only what is necessary to operate the service: Google (sign-in) and
Omise (payment). Metering metadata is internal and not shared.</p></section>
<section id="rights"><h2>8. Your rights</h2>
<ul>
<li id="p-close">You may close your account (Account page, or <code>POST /api/account/close</code>).</li>
<li id="p-refund">You may request a refund of unused balance within a bucket's {life_days}-day life.</li>
<li id="p-export">You may export your metering history as CSV or JSON (Usage page, or
<code>GET /api/usage/export</code>).</li>
</ul>
<p>To exercise any of these, or if something does not work, contact us (below).</p></section>
<section id="contact"><h2>9. Contact</h2><p>Email: to be set at launch.</p></section>
</article>"""
