// Coding Plan dashboard: the only script. Copy buttons; everything else works without it.
"use strict";
document.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-copy]");
  if (!button) return;
  const source = document.getElementById(button.dataset.copy);
  if (!source) return;
  const text = source.textContent;
  let ok = false;
  try {
    await navigator.clipboard.writeText(text);
    ok = true;
  } catch (_) {
    // Older browsers or a denied permission: select the text so Ctrl+C works.
    const range = document.createRange();
    range.selectNodeContents(source);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    ok = document.execCommand && document.execCommand("copy");
  }
  const status = document.querySelector(".copied");
  if (status) status.textContent = ok ? "Copied." : "Selected: press Ctrl+C (or Cmd+C) to copy.";
  button.textContent = ok ? "Copied" : button.textContent;
});
