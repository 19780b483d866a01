// Drives the labbook console in Debian's headless Chromium: logs in, finds the failed booking,
// opens its timeline, replays its dead letter after a dry run and sees it move. Takes a
// screenshot of each page, and checks that no page holds a password of the booking (read from
// the emails in maildev) and that a POST without the CSRF token is refused.
//
// Environment: CONSOLE_URL, CONSOLE_TOKEN, BOOKING_ID (the failed booking), TRAINER (its
// trainer's address), MAILDEV_API (maildev's list of emails), SCREENSHOTS (a directory).
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const base = env("CONSOLE_URL");
const token = env("CONSOLE_TOKEN");
const bookingId = env("BOOKING_ID");
const trainer = env("TRAINER");
const shots = env("SCREENSHOTS");
mkdirSync(shots, { recursive: true });

function check(ok, what) {
  if (!ok) throw new Error(`check failed: ${what}`);
  console.log(`ok - ${what}`);
}

/** Every password the emails to the trainer hold (trainees' and admins'). */
async function passwords() {
  const all = await (await fetch(env("MAILDEV_API"))).json();
  const mine = all.filter((e) => (e.to || []).some((t) => t.address === trainer));
  const found = new Set();
  for (const e of mine) {
    for (const m of (e.text || "").matchAll(/Password: (\S+)/g)) found.add(m[1]);
  }
  return [...found];
}

const pages = [];
async function shot(page, name) {
  await page.screenshot({ path: `${shots}/${name}.png`, fullPage: true });
  pages.push({ name, html: await page.content() });
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox"],
});
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();

  await page.goto(`${base}/bookings`);
  check(page.url().includes("/login"), "an anonymous visit is sent to the login page");
  await shot(page, "login");
  await page.fill("#token", token);
  await page.click("button[type=submit]");
  await page.waitForURL(/\/bookings/);
  check(!page.url().includes("/login"), "logged in with the console token");

  await page.selectOption("select[name=state]", "failed");
  await page.click("form.filters button.primary");
  await page.waitForURL(/state=failed/);
  const row = page.locator("tbody tr", { hasText: bookingId });
  check((await row.count()) === 1, "the failed booking is listed under state=failed");
  check((await row.innerText()).includes("dead letter"), "its dead letter is counted");
  await page.goto(`${base}/bookings`);
  await shot(page, "bookings");

  await page.click(`a:text-is("${bookingId}")`);
  await page.waitForURL(new RegExp(`/bookings/${bookingId}$`));
  const timeline = await page.locator("ol.timeline").innerText();
  check(timeline.includes("Booking failed"), "the timeline tells the failure");
  check(timeline.includes("Dead letter in provision-due.dlq"), "the timeline shows the dead letter");
  await shot(page, "booking-failed");

  await page.goto(`${base}/dead-letters`);
  await shot(page, "dead-letters");
  await page.click('a:text-is("provision-due.dlq")');
  await page.fill("input[name=booking_id]", bookingId);
  await page.click("form.filters button.primary");
  await page.waitForURL(/booking_id=/);
  await shot(page, "dead-letter-queue");
  await page.click("td a.failure");
  await page.waitForURL(/\/letters\//);
  await shot(page, "dead-letter");
  await page.goBack();

  const letterUrl = pages.find((p) => p.name === "dead-letter");
  check(Boolean(letterUrl), "the dead letter's page was shown");
  await page.check("tbody input[type=checkbox]");
  await page.click('button:text("Replay ticked (dry run)")');
  await page.waitForURL(/\/replay\?/);
  const dry = await page.locator("[role=status]").innerText();
  check(/1 dead letter would go back to provision-due/.test(dry), "the dry run says what would move");
  await shot(page, "replay-dry-run");

  const csrfRefused = await page.request.post(`${base}/dead-letters/provision-due.dlq/replay`, {
    form: { id: await page.locator("form.actions input[name=id]").first().getAttribute("value") },
    maxRedirects: 0,
  });
  check(csrfRefused.status() === 403, "a POST without the CSRF token is refused");

  await page.click('button:text("Replay 1 dead letter")');
  await page.waitForURL(/\/replay$/);
  const done = await page.locator("[role=status]").innerText();
  check(done.includes("Replayed 1 dead letter(s) to provision-due; 0 left"), "the replay moved it");
  await shot(page, "replay-done");

  let state = "";
  for (let i = 0; i < 60 && state !== "provisioned"; i++) {
    await page.goto(`${base}/bookings/${bookingId}`);
    state = (await page.locator("h1 .badge").innerText()).trim();
    if (state !== "provisioned") await page.waitForTimeout(500);
  }
  check(state === "provisioned", "the replayed booking is provisioned");
  check((await page.locator("table a[href^='http://']").count()) > 0, "its machines have addresses");
  await shot(page, "booking-provisioned");

  await page.goto(`${base}/dead-letters/provision-due.dlq?booking_id=${bookingId}`);
  check((await page.content()).includes("No dead letter matches"), "its dead letter has left the queue");
  await page.goto(`${base}/health`);
  await shot(page, "health");

  const secrets = await passwords();
  check(secrets.length > 0, `the emails hold ${secrets.length} passwords to look for`);
  for (const p of pages) {
    for (const s of secrets) check(!p.html.includes(s), `no password on the ${p.name} page`);
  }

  const stranger = await browser.newContext();
  const anon = await stranger.newPage();
  for (const path of ["/bookings", `/bookings/${bookingId}`, "/dead-letters", "/health"]) {
    await anon.goto(`${base}${path}`);
    check(anon.url().includes("/login"), `${path} needs a login`);
  }
  const api = await stranger.request.get(`${base}/api/bookings`);
  check(api.status() === 401, "the API answers 401 without the token");
} finally {
  await browser.close();
}
