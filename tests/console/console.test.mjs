// The console in a real browser (Debian's chromium, driven by playwright-core): sign in with
// a development token, create a queue, publish and watch the count change, open the message,
// pause a subscription, redrive a dead letter, and move around with the keyboard alone.
// Run by scripts/console-test.py, which starts the service and passes BASE_URL.

import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { chromium } from "playwright-core";

const base = process.env.BASE_URL;
const shots = process.env.SCREENSHOTS ?? "target/console";
assert.ok(base, "BASE_URL is required");
mkdirSync(shots, { recursive: true });

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
});
const failures = [];
let step = "start";
const page = await browser.newPage();
page.setDefaultTimeout(15000);
page.on("pageerror", (error) => failures.push(`page error: ${error.message}`));
page.on("console", (message) => message.type() === "error" && failures.push(`console error: ${message.text()}`));
// The console makes no request outside its own origin (no CDN, no fonts, no analytics).
page.on("request", (request) => {
  if (!request.url().startsWith(base) && !request.url().startsWith("data:")) failures.push(`external request: ${request.url()}`);
});

function log(text) {
  step = text;
  console.log(`console-test: ${text}`);
}

async function api(method, path, body) {
  const token = await page.evaluate(() => sessionStorage.getItem("mq.console.token"));
  const response = await fetch(`${base}/api/v1/mq/${path}`, {
    method,
    headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  assert.ok(response.ok, `${method} ${path}: ${response.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

try {
  log("the sign-in page, and a development token");
  await page.goto(`${base}/console`);
  await page.getByRole("heading", { name: "Sign in" }).waitFor();
  const policy = (await page.request.get(`${base}/console`)).headers()["content-security-policy"];
  assert.match(policy, /default-src 'none'/);
  await page.getByRole("button", { name: "Mint a development token" }).click();
  await page.getByRole("heading", { name: "Queues" }).waitFor();
  assert.equal(await page.evaluate(() => localStorage.length), 0, "nothing is kept beyond the tab's session");

  log("create a queue");
  await page.getByLabel("Name").fill("orders");
  await page.getByRole("button", { name: "Create" }).click();
  await page.getByText("Queue orders created.").waitFor();
  const row = page.locator('tr[data-queue="orders"]');
  // Counts come from the monitoring view, reused for up to MONITORING_CACHE_MS (2 s).
  await row.locator('[data-field="messages"]', { hasText: /^0$/ }).waitFor();

  log("publish from the queue page and see the count change");
  await row.getByRole("link", { name: "orders" }).click();
  await page.getByRole("heading", { name: "Queue orders" }).waitFor();
  await page.getByLabel("Payload (JSON)").fill('{"orderId": 42, "note": "<b>not markup</b>"}');
  await page.getByLabel("Key (optional)").fill("customer-7");
  await page.getByRole("button", { name: "Publish" }).click();
  await page.getByText(/^Published .* to partition \d+\.$/).waitFor();
  await page.locator('[data-stat="messageCount"]', { hasText: /^1$/ }).waitFor();
  await page.getByRole("link", { name: "Queues" }).click();
  await page.locator('tr[data-queue="orders"] [data-field="messages"]', { hasText: /^1$/ }).waitFor();
  await page.screenshot({ path: `${shots}/queues.png`, fullPage: true });

  log("open the message from the browser");
  await page.getByRole("link", { name: "orders", exact: true }).click();
  const message = page.locator("tr[data-message] a").first();
  await message.waitFor();
  await message.click();
  await page.getByRole("heading", { name: /^Message / }).waitFor();
  const payload = await page.locator("pre#payload").textContent();
  assert.deepEqual(JSON.parse(payload), { orderId: 42, note: "<b>not markup</b>" });
  assert.equal(await page.locator("pre#payload b").count(), 0, "a payload is shown as text, never as markup");
  await page.screenshot({ path: `${shots}/message.png`, fullPage: true });

  log("pause and resume a subscription");
  const subscription = await api("POST", "subscriptions", {
    queue: "orders", consumerGroup: "workers", consumerName: "w1", subscriptionType: "redis_consumer",
    offsetResetPolicy: "earliest", maxRetryAttempts: 0,
  });
  await page.getByRole("link", { name: "Subscriptions" }).click();
  const subscriptionRow = page.locator(`tr[data-subscription="${subscription.id}"]`);
  await subscriptionRow.getByRole("button", { name: "Pause" }).click();
  await subscriptionRow.locator('[data-field="status"]', { hasText: "paused" }).waitFor();
  assert.equal((await api("GET", `subscriptions/${subscription.id}`)).status, "paused");
  await subscriptionRow.getByRole("button", { name: "Resume" }).click();
  await subscriptionRow.locator('[data-field="status"]', { hasText: "active" }).waitFor();

  log("redrive a dead letter");
  const pulled = await api("POST", `subscriptions/${subscription.id}/pull`, { maxMessages: 1, waitMs: 5000 });
  assert.equal(pulled.messages.length, 1);
  await api("POST", `subscriptions/${subscription.id}/nack`, { ackIds: [pulled.messages[0].ackId] });
  await page.getByRole("link", { name: "Dead letters" }).click();
  const dlq = page.getByRole("link", { name: "orders.dlq" });
  for (let look = 0; look < 20 && !(await dlq.count()); look++) {
    await page.waitForTimeout(250);
    await page.reload();
  }
  await dlq.click();
  await page.getByRole("heading", { name: "Messages in orders.dlq" }).waitFor();
  const dead = page.locator(`tr[data-message="${pulled.messages[0].messageId}"]`);
  for (let look = 0; look < 20 && !(await dead.count()); look++) {
    await page.waitForTimeout(250);
    await page.reload();
  }
  await dead.getByRole("checkbox").check();
  await page.screenshot({ path: `${shots}/dead-letters.png`, fullPage: true });
  await page.getByRole("button", { name: "Redrive selected" }).click();
  await page.getByText("1 redriven.").waitFor();
  await dead.getByText("redriven").waitFor();
  assert.ok(await dead.getByRole("checkbox").isDisabled(), "a redriven message cannot be selected again");
  const again = await api("POST", `subscriptions/${subscription.id}/pull`, { maxMessages: 1, waitMs: 5000 });
  assert.equal(again.messages[0]?.messageId, `${pulled.messages[0].messageId}.redriven`);

  log("keyboard only: skip link, navigation, and focus on each new page's heading");
  await page.goto(`${base}/console#/queues`);
  await page.reload();
  await page.getByRole("heading", { name: "Queues" }).waitFor();
  await page.keyboard.press("Tab");
  assert.equal(await page.evaluate(() => document.activeElement.textContent), "Skip to content");
  await page.keyboard.press("Tab");
  assert.equal(await page.evaluate(() => document.activeElement.textContent), "Queues");
  await page.keyboard.press("Tab");
  assert.equal(await page.evaluate(() => document.activeElement.textContent), "Subscriptions");
  await page.keyboard.press("Enter");
  await page.getByRole("heading", { name: "Subscriptions" }).waitFor();
  assert.equal(await page.evaluate(() => document.activeElement.tagName), "H1");
  // The live refresh of the queues page leaves the keyboard where it was.
  await page.getByRole("link", { name: "Queues" }).click();
  await page.getByRole("heading", { name: "Queues" }).waitFor();
  await page.focus('tr[data-queue="orders"] a');
  await page.waitForTimeout(2600);
  assert.equal(await page.evaluate(() => document.activeElement.getAttribute("href")), "#/queues/orders");

  log("sign out");
  await page.getByRole("button", { name: "Sign out" }).click();
  await page.getByRole("heading", { name: "Sign in" }).waitFor();
  assert.equal(await page.evaluate(() => sessionStorage.length), 0);
} catch (error) {
  failures.push(`${step}: ${error.stack ?? error}`);
  await page.screenshot({ path: `${shots}/failure.png`, fullPage: true }).catch(() => {});
} finally {
  await browser.close();
}

if (failures.length) {
  console.error(`console-test: FAILED\n${failures.join("\n")}\n(screenshots in ${shots})`);
  process.exit(1);
}
console.log(`console-test: passed (screenshots in ${shots})`);
