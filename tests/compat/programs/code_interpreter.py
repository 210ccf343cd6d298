"""A stateful code interpreter (after ``simple_code_interpreter.py``): a driver reads JSON lines of code on the
sandbox process's stdin, runs them in one namespace and answers with captured stdout/stderr as a JSON line."""

import inspect
import json

import modal


def interpreter_loop():
    import contextlib
    import io
    import json
    import sys

    namespace = {}
    for line in sys.stdin:
        request = json.loads(line)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                exec(request["code"], namespace)
            except Exception as exc:
                print(f"Execution Error: {exc}", file=sys.stderr)
        print(json.dumps({"stdout": out.getvalue(), "stderr": err.getvalue()}), flush=True)


def run_code(process: modal.container_process.ContainerProcess, code: str) -> dict:
    process.stdin.write(json.dumps({"code": code}))
    process.stdin.write("\n")
    process.stdin.drain()
    return json.loads(next(iter(process.stdout)))


source = inspect.getsource(interpreter_loop) + "\n\ninterpreter_loop()\n"
app = modal.App.lookup("code-interpreter", create_if_missing=True)
sb = modal.Sandbox.create(app=app)
process = sb.exec("python", "-c", source)

answers = [
    run_code(process, "print('hello, world!')"),
    run_code(process, "a = 10"),
    run_code(process, "b = 5"),
    run_code(process, "total = a + b"),
    run_code(process, "print(f'The total is: {total}')"),
    run_code(process, "1 / 0"),
]
sb.terminate()
print("RESULT " + json.dumps(answers))
