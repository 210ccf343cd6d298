"""Untrusted code in several languages (after ``safe_code_execution.py``): an image with Node.js, Ruby and PHP,
one process per language, a shell pipeline across two of them, streamed output, and finally ``rm -rf /``."""

import json
import time

import modal

image = modal.Image.debian_slim(python_version="3.11").apt_install("nodejs", "ruby", "php")
app = modal.App.lookup("safe-code-execution", create_if_missing=True)

with modal.enable_output():
    sandbox = modal.Sandbox.create(app=app, image=image)
print(f"Sandbox ID: {sandbox.object_id}")

processes = {
    "bash": sandbox.exec("echo", "hello from bash"),
    "python": sandbox.exec("python", "-c", "print('hello from python')"),
    "node": sandbox.exec("node", "-e", 'console.log("hello from node")'),
    "ruby": sandbox.exec("ruby", "-e", "puts 'hello from ruby'"),
    "php": sandbox.exec("php", "-r", "echo 'hello from php';"),
}
hellos = {name: p.stdout.read() for name, p in processes.items()}

pipeline = sandbox.exec(
    "bash",
    "-c",
    "python -c 'print(\" \".join(str(n) for n in range(1, 11)))' | "
    'node -e \'require("readline").createInterface({input: process.stdin}).on("line", l => '
    'console.log("sum: " + l.split(" ").map(Number).reduce((x, y) => x + y, 0)))\'',
)
total = pipeline.stdout.read().strip()

ticker = sandbox.exec("ruby", "-e", '4.times { |i| puts "tick #{i + 1}"; STDOUT.flush; sleep 0.5 }')
arrivals = []
for line in ticker.stdout:
    arrivals.append([line.strip(), time.monotonic()])

wipe = sandbox.exec("rm", "-rf", "/", "--no-preserve-root")
wipe.wait()
after = sandbox.exec("ls", "/")
after.wait()
sandbox.terminate()
print("RESULT " + json.dumps({"hellos": hellos, "sum": total, "ticks": arrivals, "ls_after_wipe": after.returncode}))
