// Top-up page: card details go to Omise.js (never to us); we post only the token id and the amount.
"use strict";
(function () {
  const form = document.getElementById("topup-form");
  if (!form) return;
  const status = document.getElementById("topup-status");
  const csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  const say = (text) => { status.textContent = text; };
  const value = (id) => (document.getElementById(id).value || "").trim();

  function amount() {
    const custom = value("custom-amount");
    if (custom) return custom;
    const preset = form.querySelector('input[name="preset"]:checked');
    return preset ? preset.value : "";
  }

  async function start(body) {
    const resp = await fetch("/api/topups", {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body),
      credentials: "same-origin",
    });
    const data = await resp.json();
    if (!resp.ok) throw new Error((data.error && data.error.message) || "The top-up could not start.");
    return data;
  }

  function follow(data) {
    if (data.authorize_uri) { say("Redirecting to your bank for 3-D Secure..."); window.location.assign(data.authorize_uri); return; }
    if (data.qr) { showQr(data); return; }
    window.location.assign(data.return_uri);
  }

  function showQr(data) {
    document.getElementById("promptpay-qr").hidden = false;
    document.getElementById("qr-image").src = data.qr;
    say("Waiting for the PromptPay payment...");
    const poll = async () => {
      const resp = await fetch("/api/topups/" + encodeURIComponent(data.topup_id), { credentials: "same-origin" });
      const now = resp.ok ? await resp.json() : { status: "pending" };
      if (now.status === "pending") { setTimeout(poll, 3000); return; }
      window.location.assign(data.return_uri);
    };
    setTimeout(poll, 3000);
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (typeof Omise === "undefined") { say("The card form could not load Omise.js; try again later."); return; }
    const chosen = amount();
    say("Checking your card with Omise...");
    Omise.setPublicKey(form.dataset.publicKey);
    Omise.createToken("card", {
      name: value("card-name"),
      number: value("card-number").replace(/\s+/g, ""),
      expiration_month: value("card-exp-month"),
      expiration_year: value("card-exp-year"),
      security_code: value("card-cvc"),
    }, async (statusCode, response) => {
      if (statusCode !== 200) { say(response.message || "Omise refused the card details."); return; }
      try { follow(await start({ amount: chosen, token: response.id })); } catch (err) { say(err.message); }
    });
  });

  document.getElementById("pay-promptpay").addEventListener("click", async () => {
    try { follow(await start({ amount: amount(), method: "promptpay" })); } catch (err) { say(err.message); }
  });
})();
