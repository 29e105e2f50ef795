// The console's only script, served from the binary (CSP: default-src 'self').
// It refreshes the live part of the page and sends actions with the token in an
// Authorization header. Everything it inserts is markup the server escaped; messages go in
// with textContent.
'use strict';

(function () {
  const REFRESH_MS = 3000;

  function say(text, bad) {
    const status = document.getElementById('status');
    if (!status) return;
    status.textContent = text;
    status.className = bad ? 'bad' : 'ok';
  }

  function token() {
    const input = document.getElementById('token');
    return input ? input.value.trim() : '';
  }

  // A purge waits for a second click on the same button within a few seconds (no dialog);
  // the page does not refresh meanwhile, so the button stays where it was.
  const ARM_MS = 5000;
  let armed = null;

  function isArmed() {
    return armed !== null && Date.now() < armed.until;
  }

  let refreshing = false;
  async function refresh() {
    if (refreshing || isArmed()) return;
    refreshing = true;
    try {
      const response = await fetch('/console/live', { cache: 'no-store', credentials: 'omit' });
      if (!response.ok) {
        say('refresh failed: HTTP ' + response.status, true);
        return;
      }
      const markup = await response.text();
      const live = document.getElementById('live');
      // Keep what the operator opened, closed and selected across the refresh.
      const open = new Map();
      live.querySelectorAll('details[id]').forEach((d) => open.set(d.id, d.open));
      const picked = new Set();
      live.querySelectorAll('input.pick:checked').forEach((c) => picked.add(c.dataset.key));
      live.innerHTML = markup;
      live.querySelectorAll('details[id]').forEach((d) => {
        if (open.has(d.id)) d.open = open.get(d.id);
      });
      live.querySelectorAll('input.pick').forEach((c) => {
        c.checked = picked.has(c.dataset.key);
      });
      document.body.dataset.refreshed = String(Date.now());
    } catch (e) {
      say('cannot reach this replica: ' + e, true);
    } finally {
      refreshing = false;
    }
  }

  async function act(button) {
    const group = button.dataset.group;
    const action = button.dataset.action;
    let ids = [];
    if (button.dataset.id) {
      ids = [button.dataset.id];
    } else if (button.dataset.selection) {
      document.querySelectorAll('input.pick:checked').forEach((c) => {
        if (c.dataset.group === group) ids.push(c.dataset.id);
      });
      if (ids.length === 0) {
        say('select dead letters first', true);
        return;
      }
    }
    if (action === 'purge') {
      const key = group + '/' + (button.dataset.id || 'selection');
      if (!isArmed() || armed.key !== key) {
        armed = { key: key, until: Date.now() + ARM_MS };
        button.textContent = 'click again to purge ' + ids.length;
        say('click again within 5 s to purge ' + ids.length + ' dead letter(s) for good', false);
        return;
      }
      armed = null;
    }
    say(action + ' ' + group + '…', false);
    try {
      const response = await fetch(
        '/console/groups/' + encodeURIComponent(group) + '/' + encodeURIComponent(action),
        {
          method: 'POST',
          credentials: 'omit',
          cache: 'no-store',
          headers: {
            Authorization: 'Bearer ' + token(),
            'Content-Type': 'application/json',
          },
          body: JSON.stringify({ ids: ids }),
        },
      );
      const text = (await response.text()).trim();
      say(response.ok ? text : action + ' refused (HTTP ' + response.status + '): ' + text, !response.ok);
    } catch (e) {
      say(action + ' failed: ' + e, true);
    }
    refresh();
  }

  document.addEventListener('click', (event) => {
    const button = event.target.closest('button[data-action]');
    if (button) act(button);
  });

  document.addEventListener('DOMContentLoaded', () => {
    setInterval(refresh, REFRESH_MS);
  });
})();
